"""Triton kernels vs their eager references (on CPU tensors, through the Triton interpreter), the
references vs independent formulas, and the switch.

The interpreter needs TRITON_INTERPRET=1 before triton is imported (triton jits its own library
functions, `tl.sum`, `tl.interleave`, at import), so this module sets it at import, but only on
a machine without CUDA: there nothing can be compiled, and no GPU test can be turned into an
interpreted one (review #9). With CUDA the interpreter tests skip, and the same kernels run
compiled in tests/test_gpu.py. Kernel tests also skip, saying why, where triton is not installed.
"""
import importlib.util
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import asd_deploy.kernels as K
from asd_deploy.kernels import _launch
from asd_deploy.kernels.adaln import adaln_kernel, adaln_reference, adaln_triton
from asd_deploy.kernels.gated_residual import gated_residual_kernel, gated_residual_reference, gated_residual_triton
from asd_deploy.kernels.qk_norm_rope import qk_norm_rope_kernel, qk_norm_rope_reference, qk_norm_rope_triton
from conftest import assert_close


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not INTERPRETED,
    reason="triton is not installed (pip install triton)" if importlib.util.find_spec("triton") is None else
    "CUDA is present: the kernels are tested compiled on it (tests/test_gpu.py); the interpreter tests run "
    "on machines without CUDA, or with TRITON_INTERPRET=1 set before pytest starts")
FP32_ATOL = 1e-5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=_gen(seed)).to(dtype)


def _ulp_atol(expected, dtype):
    """One unit in the last place of `dtype` at the largest magnitude: the interpreter rounds
    fp32 -> bf16 toward zero where torch rounds to nearest, so bf16 results differ by up to 1 ulp."""
    return torch.finfo(dtype).eps * max(1.0, expected.float().abs().max().item())


# ---------------------------------------------------------------------------------------------
# sample inputs per kernel: (args, kwargs) in the kernel's signature
# ---------------------------------------------------------------------------------------------


def _adaln_args(B, F_, HW, D, dtype=torch.float32):
    return (_randn(B, F_ * HW, D, seed=1, dtype=dtype), _randn(B, F_, D, seed=2), 0.5 * _randn(B, F_, D, seed=3)), {}


def _gated_args(B, F_, HW, D, dtype=torch.float32):
    return (_randn(B, F_ * HW, D, seed=1, dtype=dtype), _randn(B, F_ * HW, D, seed=2, dtype=dtype),
            _randn(B, F_, D, seed=3)), {}


def _rope_args(B, L, H, Dh, dtype=torch.float32):
    angles = 3.0 * _randn(L, Dh // 2, seed=4)
    return (_randn(B, L, H * Dh, seed=1, dtype=dtype), 1 + 0.1 * _randn(H * Dh, seed=2), angles.cos(), angles.sin(),
            H), {}


KERNELS = {  # name: (kernel, launcher, reference, sample args for a medium shape)
    "adaln": (adaln_kernel, adaln_triton, adaln_reference, lambda dt=torch.float32: _adaln_args(2, 3, 7, 33, dt)),
    "gated_residual": (gated_residual_kernel, gated_residual_triton, gated_residual_reference,
                       lambda dt=torch.float32: _gated_args(2, 3, 7, 33, dt)),
    "qk_norm_rope": (qk_norm_rope_kernel, qk_norm_rope_triton, qk_norm_rope_reference,
                     lambda dt=torch.float32: _rope_args(2, 21, 3, 22, dt)),
}


def _check_kernel(name, args, kwargs=None, atol=FP32_ATOL):
    _, launcher, reference, _ = KERNELS[name]
    expected = reference(*args, **(kwargs or {}))
    actual = launcher(*args, **(kwargs or {}))
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert_close(actual, expected, atol, f"{name} kernel vs reference")


# ---------------------------------------------------------------------------------------------
# kernels vs references (fp32, odd shapes)
# ---------------------------------------------------------------------------------------------

SHAPES = [(B, F_, HW, D) for B in (1, 2) for F_ in (1, 3) for HW in (1, 6, 7) for D in (33, 64, 97)]


@needs_triton
@pytest.mark.parametrize("B,F_,HW,D", SHAPES)
def test_adaln_kernel(B, F_, HW, D):
    _check_kernel("adaln", *_adaln_args(B, F_, HW, D))


@needs_triton
@pytest.mark.parametrize("B,F_,HW,D", SHAPES)
def test_gated_residual_kernel(B, F_, HW, D):
    _check_kernel("gated_residual", *_gated_args(B, F_, HW, D))


@needs_triton
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("L", [1, 7, 18])
@pytest.mark.parametrize("H,Dh", [(1, 2), (1, 64), (3, 22), (3, 10), (2, 128)])
def test_qk_norm_rope_kernel(B, L, H, Dh):
    _check_kernel("qk_norm_rope", *_rope_args(B, L, H, Dh))


@needs_triton
@pytest.mark.parametrize("name", list(KERNELS))
def test_many_programs_with_ragged_tail(name, monkeypatch):
    """4 rows per program: many programs, the last one partly masked (the cases above fit one)."""
    monkeypatch.setattr(_launch, "MAX_ROWS", 4)
    monkeypatch.setattr(_launch, "MAX_TILE", 256)
    args, kwargs = {"adaln": lambda: _adaln_args(2, 3, 7, 97), "gated_residual": lambda: _gated_args(2, 3, 7, 97),
                    "qk_norm_rope": lambda: _rope_args(2, 21, 3, 22)}[name]()
    launches = KERNELS[name][0].launches
    _check_kernel(name, args, kwargs)
    assert KERNELS[name][0].launches == launches + 1


@needs_triton
def test_strided_inputs():
    """Non-contiguous x (a [B, D, L] buffer seen transposed, a slice of a fused qkv), per-frame
    tensors sliced out of the model's [B, F, 6, D] modulation or broadcast from [1, F, D]."""
    B, F_, HW, D, H = 2, 3, 7, 66, 3
    L = F_ * HW
    x = _randn(B, D, L, seed=1).transpose(1, 2)                    # [B, L, D], stride_d = L
    mod = _randn(B, F_, 6, D, seed=2)
    shift, scale, gate = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]   # [B, F, D], stride_f = 6 * D
    _check_kernel("adaln", (x, shift, scale), {"eps": 1e-5})
    _check_kernel("adaln", (x, shift[:1], scale[:1]))               # broadcast over batch
    _check_kernel("gated_residual", (x, _randn(B, L, 2 * D, seed=3)[..., ::2], gate))
    qkv = _randn(B, L, 3 * D, seed=4)
    angles = _randn(D // H // 2, L, seed=5).t()                     # [L, Dh/2] transposed table
    _check_kernel("qk_norm_rope", (qkv[..., D:2 * D], _randn(2 * D, seed=6)[::2], angles.cos(), angles.sin(), H))


@needs_triton
@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_one_ulp(name, dtype):
    args, kwargs = KERNELS[name][3](dtype)
    expected = KERNELS[name][2](*args, **kwargs)
    assert expected.dtype == dtype
    _check_kernel(name, args, kwargs, atol=_ulp_atol(expected, dtype))


@needs_triton
def test_empty_inputs():
    assert adaln_triton(torch.zeros(2, 0, 5), torch.zeros(2, 3, 5), torch.zeros(2, 3, 5)).shape == (2, 0, 5)
    assert qk_norm_rope_triton(torch.zeros(1, 0, 8), torch.ones(8), torch.zeros(0, 2), torch.zeros(0, 2),
                               2).shape == (1, 0, 2, 4)


# ---------------------------------------------------------------------------------------------
# references vs independent formulas (float64, written differently)
# ---------------------------------------------------------------------------------------------


def test_adaln_reference_is_per_frame_layer_norm():
    B, F_, HW, D = 2, 3, 5, 19
    x, shift, scale = _adaln_args(B, F_, HW, D)[0]
    xd = x.double()
    xn = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expected = xn * (1 + scale.double().repeat_interleave(HW, dim=1)) + shift.double().repeat_interleave(HW, dim=1)
    assert_close(adaln_reference(x, shift, scale), expected, FP32_ATOL, "adaln reference vs formula")
    assert_close(adaln_reference(x, shift * 0, scale * 0, eps=1e-3),
                 F.layer_norm(x, (D,), eps=1e-3), FP32_ATOL, "adaln reference, no modulation")


def test_gated_residual_reference_is_per_frame():
    B, F_, HW, D = 2, 3, 4, 9
    x, y, gate = _gated_args(B, F_, HW, D)[0]
    expected = torch.stack([x[:, l].double() + gate[:, l // HW].double() * y[:, l].double()
                            for l in range(F_ * HW)], dim=1)
    assert_close(gated_residual_reference(x, y, gate), expected, FP32_ATOL, "gated residual reference vs loop")


def test_qk_norm_rope_reference_is_rms_norm_then_complex_rotation():
    B, L, H, Dh = 2, 6, 3, 10
    x, weight, cos, sin, _ = _rope_args(B, L, H, Dh)[0]
    normed = F.rms_norm(x.double(), (H * Dh,), weight.double(), eps=1e-6)      # over all of D
    pairs = torch.view_as_complex(normed.unflatten(-1, (H, Dh // 2, 2)).contiguous())  # [B, L, H, Dh/2]
    rot = torch.complex(cos.double(), sin.double())[None, :, None]              # e^{i theta[l, i]}
    expected = torch.view_as_real(pairs * rot).flatten(-2)                       # [B, L, H, Dh]
    assert_close(qk_norm_rope_reference(x, weight, cos, sin, H), expected, FP32_ATOL,
                 "qk_norm_rope reference vs complex RoPE")


def test_references_match_the_model_ops():
    """The eager model's own ops (asd_deploy.model) agree with the references at fp32."""
    import asd_deploy.model as model

    missing = [n for n in ("layer_norm", "modulate", "gate", "RMSNorm", "apply_rope") if not hasattr(model, n)]
    assert not missing, f"asd_deploy.model no longer has {missing}: point this parity test at the renamed ops"
    B, F_, HW, D, H = 2, 3, 5, 24, 2
    x, shift, scale = _adaln_args(B, F_, HW, D)[0]
    assert_close(adaln_reference(x, shift, scale), model.modulate(model.layer_norm(x, 1e-6), shift, scale, F_),
                 FP32_ATOL, "adaln vs model.modulate(layer_norm)")
    y = _randn(B, F_ * HW, D, seed=9)
    assert_close(gated_residual_reference(x, y, scale), model.gate(x, y, scale, F_), FP32_ATOL,
                 "gated_residual vs model.gate")
    norm = model.RMSNorm(D, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * _randn(D, seed=10))
        angles = _randn(F_ * HW, D // H // 2, seed=11)
        expected = model.apply_rope(norm(x).unflatten(-1, (H, -1)), angles.cos(), angles.sin())
    assert_close(qk_norm_rope_reference(x, norm.weight.detach(), angles.cos(), angles.sin(), H), expected,
                 FP32_ATOL, "qk_norm_rope vs model.apply_rope(RMSNorm)")


def test_shape_errors_are_specific():
    x = torch.zeros(1, 10, 8)
    with pytest.raises(ValueError, match="F dividing L"):
        adaln_reference(x, torch.zeros(1, 3, 8), torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="even head dim"):
        qk_norm_rope_reference(torch.zeros(1, 10, 9), torch.ones(9), torch.zeros(10, 1), torch.zeros(10, 1), 3)
    with pytest.raises(ValueError, match=r"cos must be \[L, head_dim/2\]"):
        qk_norm_rope_reference(x, torch.ones(8), torch.zeros(10, 4), torch.zeros(10, 2), 2)


# ---------------------------------------------------------------------------------------------
# the switch
# ---------------------------------------------------------------------------------------------


def test_mode_and_use_triton(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.kernel_mode() == "auto"
    assert not K.use_triton(torch.device("cpu"))
    assert K.use_triton("cuda") == _launch.triton_importable()
    monkeypatch.setenv(K.ENV_VAR, "triton")
    assert K.use_triton("cpu") and K.use_triton("cuda")
    monkeypatch.setenv(K.ENV_VAR, "reference")
    assert not K.use_triton("cpu") and not K.use_triton("cuda")
    monkeypatch.setenv(K.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="ASD_KERNELS='fast' is not one of triton, reference, auto"):
        K.use_triton("cpu")


def _raise(*args, **kwargs):
    raise AssertionError("the other path was taken")


@needs_triton
@pytest.mark.parametrize("name", list(KERNELS))
def test_dispatch_runs_the_kernel_when_asked(name, monkeypatch):
    kernel, _, _, sample = KERNELS[name]
    args, kwargs = sample()
    expected = KERNELS[name][2](*args, **kwargs)
    monkeypatch.setenv(K.ENV_VAR, "triton")
    monkeypatch.setattr(K, f"{name}_reference", _raise)
    launches = kernel.launches
    assert_close(getattr(K, name)(*args, **kwargs), expected, FP32_ATOL, f"dispatched {name}")
    assert kernel.launches == launches + 1, f"{name}: ASD_KERNELS=triton did not launch the kernel"
    assert kernel.interpreted, "CPU kernels must run under the Triton interpreter"
    assert isinstance(getattr(torch.ops.asd, name), torch._ops.OpOverloadPacket), "kernel not a torch operator"


@pytest.mark.parametrize("mode", ["reference", "auto"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_dispatch_runs_the_reference_on_cpu(name, mode, monkeypatch):
    kernel, _, reference, sample = KERNELS[name]
    args, kwargs = sample()
    monkeypatch.setenv(K.ENV_VAR, mode)
    monkeypatch.setattr(K, f"{name}_triton", _raise)
    launches = kernel.launches
    assert_close(getattr(K, name)(*args, **kwargs), reference(*args, **kwargs), 0, f"dispatched {name}")
    assert kernel.launches == launches


@needs_triton
def test_kernel_on_an_unrunnable_device_says_so(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "triton")
    meta = [torch.empty(1, 6, 8, device="meta"), torch.empty(1, 3, 8, device="meta")]
    with pytest.raises(RuntimeError, match="run on CUDA tensors .* got tensors on meta"):
        K.adaln(meta[0], meta[1], meta[1])
    with pytest.raises(RuntimeError, match="must be on one device"):
        K.gated_residual(torch.zeros(1, 6, 8), meta[0], torch.zeros(1, 3, 8))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CPU tensors only under the Triton interpreter: set TRITON_INTERPRET=1"):
        _launch.check_runnable("demo", x=torch.zeros(2))


@needs_triton
def test_a_kernel_keeps_its_compiled_and_interpreted_builds_apart():
    """One process may run the interpreter on CPU tensors and compiled kernels on CUDA tensors:
    the CUDA build is a JITFunction whatever TRITON_INTERPRET says (a full pytest run on a GPU
    host must not interpret its GPU tests)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    k = _launch.LazyKernel(adaln_kernel.fn)
    assert isinstance(k.build("cpu"), InterpretedFunction) and k.interpreted
    assert isinstance(k.build("cuda"), JITFunction) and not isinstance(k.build("cuda"), InterpretedFunction)
    assert not k.interpreted


def test_switch_is_a_constant_under_torch_compile(monkeypatch):
    """Dynamo refuses to trace importlib (triton_importable): the switch must not break a
    fullgraph compile, whatever the device (the review's reproduction, #5)."""
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + 1 if K.use_triton("cuda") else x - 1, fullgraph=True, backend="eager")
    want = 1.0 if _launch.triton_importable() else -1.0
    assert f(torch.zeros(2)).tolist() == [want, want]
    monkeypatch.setenv(K.ENV_VAR, "triton")  # CPU tensors under compile: the reference (Inductor fuses it)
    torch._dynamo.reset()
    x, m = torch.randn(1, 6, 8), torch.randn(1, 3, 2, 8)
    g = torch.compile(lambda x, m: K.adaln(x, m[:, :, 0], m[:, :, 1]), fullgraph=True, backend="eager")
    assert_close(g(x, m), adaln_reference(x, m[:, :, 0], m[:, :, 1]), 0, "compiled dispatch on CPU")


def test_import_is_lazy_and_works_without_triton():
    """A fresh interpreter: importing the package does not import triton; with triton made
    unimportable, `auto` falls back and `triton` fails saying what to do."""
    code = (
        "import sys, os, torch\n"
        "import asd_deploy.kernels as K\n"
        "assert 'triton' not in sys.modules, 'importing asd_deploy.kernels imported triton'\n"
        "sys.modules['triton'] = None\n"
        "x, g = torch.randn(1, 4, 6), torch.randn(1, 2, 6)\n"
        "assert not K.use_triton('cuda')\n"
        "K.gated_residual(x, x, g)\n"
        "os.environ['ASD_KERNELS'] = 'triton'\n"
        "try:\n"
        "    K.gated_residual(x, x, g)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ASD_KERNELS", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      env.get("PYTHONPATH")]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_model_with_triton_kernels_matches_plain_torch(monkeypatch):
    """The model routes through the kernels when ASD_KERNELS=triton (interpreter here) and gives
    the plain-torch output: the whole chunk step and the cache loop, fp32 within 1e-5."""
    import torch

    from asd_deploy import kernels as K
    from asd_deploy.cache import KVCache
    from asd_deploy.config import ModelConfig
    from asd_deploy.model import build_model
    from conftest import assert_close

    cfg = ModelConfig.preset("tiny")
    m = build_model(cfg, seed=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 6, cfg.latent_height, cfg.latent_width, generator=g)
    t = torch.tensor([[900.0, 500, 10, 0, 250, 700]])
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    calls = []
    for name in ("adaln", "gated_residual", "qk_norm_rope"):
        orig = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    with torch.no_grad():
        monkeypatch.setenv("ASD_KERNELS", "reference")
        ref = m.forward_train(x, t, ctx)
        assert calls == []
        monkeypatch.setenv("ASD_KERNELS", "triton")
        out = m.forward_train(x, t, ctx)
        assert set(calls) == {"adaln", "gated_residual", "qk_norm_rope"}
        assert_close(out, ref, 1e-5, "forward_train with Triton kernels")
        ck, cv = m.cross_kv(ctx)
        cache = KVCache(cfg)
        flow, kn, vn = m.forward_step(x[:, :, :3], t[:, :3], ck, cv, cache.k, cache.v, cache.frame_index,
                                      cache.cache_len)
        assert_close(flow, ref[:, :, :3], 1e-5, "forward_step with Triton kernels")
