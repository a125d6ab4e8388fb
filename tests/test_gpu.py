"""The GPU path on a CUDA GPU: compiled Triton kernels, CUDA graphs, torch.compile, AOTInductor and
ONNX Runtime on CUDA, each against eager. Every test is `gpu`-marked and skips without CUDA (CI has
none; they ran on an H200: benchmarks/reports/2026-12-04-NVIDIA-H200). `python -m benchmarks.gpu --check` runs this file
with the TensorRT tests (warnings from asd_deploy as errors) before the benchmark.

Tolerances: fp32 1e-4 absolute (TF32 is off for torch matmuls by default); kernels in bf16/fp16
two units in the last place of the output's magnitude (one rounding of an fp32 result, where the
reference rounds twice at most).
"""
import importlib.util
import os

import pytest
import torch

from asd_deploy.cache import KVCache
from asd_deploy.config import ModelConfig
from asd_deploy.generator import EagerStep, generate
from asd_deploy.model import build_model
from asd_deploy.schedule import Schedule
from conftest import assert_close, rand_context

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here; not run)")]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
WAN = ModelConfig.preset("wan2.1-1.3b")


def _video(step, ctx, **kw):
    return torch.cat([c.clone() for c in generate(step, ctx, **kw)], dim=2)


@pytest.fixture
def kernels_on(monkeypatch):
    monkeypatch.setenv("ASD_KERNELS", "auto")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ---------------------------------------------------------------------------------------------
# kernels, compiled for this GPU
# ---------------------------------------------------------------------------------------------

KERNEL_SHAPES = [(2, 3, 7, 66, 3), (1, 3, 6, 64, 2), (1, 3, 5, 30, 5),   # B, F, HW, D, heads: odd D and L
                 (1, 3, 1560, WAN.dim, WAN.num_heads)]                    # a Wan-1.3B chunk at 480x832


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,F,HW,D,H", KERNEL_SHAPES)
def test_kernels_compiled_match_references(B, F, HW, D, H, dtype, kernels_on):
    from asd_deploy.kernels.adaln import adaln_kernel, adaln_reference, adaln_triton
    from asd_deploy.kernels.gated_residual import gated_residual_reference, gated_residual_triton
    from asd_deploy.kernels.qk_norm_rope import qk_norm_rope_reference, qk_norm_rope_triton

    g = torch.Generator().manual_seed(0)
    L = F * HW
    x = torch.randn(B, L, D, generator=g).cuda().to(dtype)
    mod = torch.randn(B, F, 6, D, generator=g).cuda()  # fp32 modulation, strided slices as the model passes
    y = torch.randn(B, L, D, generator=g).cuda().to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).cuda().to(dtype)
    ang = torch.randn(L, D // H // 2, generator=g).cuda()
    cases = {"adaln": (adaln_triton, adaln_reference, (x, mod[:, :, 0], 0.5 * mod[:, :, 1])),
             "gated_residual": (gated_residual_triton, gated_residual_reference, (x, y, mod[:, :, 2])),
             "qk_norm_rope": (qk_norm_rope_triton, qk_norm_rope_reference, (x, w, ang.cos(), ang.sin(), H))}
    for name, (kernel, reference, args) in cases.items():
        want = reference(*args)
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * max(1.0, want.float().abs().max().item())
        assert_close(kernel(*args), want, tol, f"{name} {dtype} {list(x.shape)}")
    assert adaln_kernel.interpreted is False, "the CUDA kernel ran in the Triton interpreter"


@needs_triton
def test_kernel_operators_pass_opcheck(kernels_on):
    """Schema, fake (meta) implementation and dispatch of the torch.ops.asd operators."""
    from asd_deploy.kernels.ops import ops

    asd = ops()
    x = torch.randn(1, 12, 64, device="cuda", dtype=torch.bfloat16)
    mod = torch.randn(1, 3, 6, 64, device="cuda")
    ang = torch.randn(12, 16, device="cuda")
    torch.library.opcheck(asd.adaln, (x, mod[:, :, 0], mod[:, :, 1], 1e-6))
    torch.library.opcheck(asd.gated_residual, (x, x, mod[:, :, 2]))
    torch.library.opcheck(asd.qk_norm_rope, (x, torch.ones(64, device="cuda"), ang.cos(), ang.sin(), 2, 1e-6))


@needs_triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_their_tensors_gpu(kernels_on):
    from asd_deploy.kernels.adaln import adaln_reference, adaln_triton

    torch.cuda.set_device(0)
    x = torch.randn(1, 18, 64, device="cuda:1")
    s = torch.randn(1, 3, 64, device="cuda:1")
    assert_close(adaln_triton(x, s, s), adaln_reference(x, s, s), 1e-5, "adaln on cuda:1 with device 0 current")


@needs_triton
def test_model_with_kernels_matches_plain_torch(monkeypatch):
    cfg = ModelConfig.preset("tiny")
    m = build_model(cfg, device="cuda", seed=2)
    ctx = rand_context(cfg).cuda()
    with torch.no_grad():
        ck, cv = m.cross_kv(ctx)
        cache = KVCache(cfg, device="cuda")
        x, t = torch.randn(cfg.chunk_shape(), device="cuda"), torch.full((1, 3), 500.0, device="cuda")
        args = (x, t, ck, cv, cache.k, cache.v, cache.frame_index, cache.cache_len)
        monkeypatch.setenv("ASD_KERNELS", "reference")
        ref = m.forward_step(*args)
        monkeypatch.setenv("ASD_KERNELS", "triton")
        out = m.forward_step(*args)
    for a, b in zip(out, ref):
        assert_close(a, b, 1e-4, "forward_step with kernels vs plain torch")


# ---------------------------------------------------------------------------------------------
# the loop: live cache, CUDA graphs, torch.compile, AOTInductor, ONNX Runtime
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_model():
    cfg = ModelConfig.preset("tiny")
    return build_model(cfg, device="cuda", seed=0)


def test_live_cache_is_the_cuda_default_and_matches_plain(cuda_model):
    ctx = rand_context(cuda_model.config).cuda()
    live = EagerStep(cuda_model)
    assert live.live_cache
    kw = dict(num_chunks=8, schedule=Schedule(steps=2, ffe=True), seed=1)
    assert_close(_video(live, ctx, **kw), _video(EagerStep(cuda_model, live_cache=False), ctx, **kw), 1e-4,
                 "live vs plain cache")


@pytest.mark.parametrize("whole_chunk", [True, False])
@pytest.mark.parametrize("schedule", [Schedule(steps=1), Schedule(steps=2, ffe=True)])
def test_cuda_graph_replay_equals_eager_through_rolling_window(cuda_model, schedule, whole_chunk, kernels_on):
    """8 chunks through the rolling window (tiny: 3-chunk cache), graphs really captured and
    replayed (a failed capture raises), same video as eager."""
    from asd_deploy.backends.graphs import CudaGraphAPI, GraphedStep

    ctx = rand_context(cuda_model.config).cuda()
    kw = dict(num_chunks=8, schedule=schedule, seed=3)
    api = CudaGraphAPI()
    graphed = GraphedStep(EagerStep(cuda_model), api, whole_chunk=whole_chunk)
    v = _video(graphed, ctx, **kw)
    assert api.captures == (2 if whole_chunk else 1)
    assert api.replays == (8 if whole_chunk else sum(schedule.steps_for_chunk(c) for c in range(8)) + 7)
    assert_close(v, _video(EagerStep(cuda_model), ctx, **kw), 1e-4, "CUDA graph vs eager")


def test_compile_backend_on_cuda_matches_eager(cuda_model, kernels_on):
    from asd_deploy.backends.compiled import CompiledStep

    torch._dynamo.reset()
    ctx = rand_context(cuda_model.config).cuda()
    kw = dict(num_chunks=5, schedule=Schedule(steps=2, ffe=True), seed=4)
    assert_close(_video(CompiledStep(cuda_model), ctx, **kw), _video(EagerStep(cuda_model), ctx, **kw), 1e-4,
                 "torch.compile (Triton kernels as operators) vs eager")


def test_compiled_step_in_a_cuda_graph(cuda_model, kernels_on):
    from asd_deploy.backends.compiled import CompiledStep
    from asd_deploy.backends.graphs import CudaGraphAPI, GraphedStep

    torch._dynamo.reset()
    ctx = rand_context(cuda_model.config).cuda()
    api = CudaGraphAPI()
    v = _video(GraphedStep(CompiledStep(cuda_model), api), ctx, num_chunks=8, seed=5)
    assert api.captures == 2
    assert_close(v, _video(EagerStep(cuda_model), ctx, num_chunks=8, seed=5), 1e-4, "compiled + graph vs eager")


def test_aoti_cuda_package_matches_eager(cuda_model, tmp_path, kernels_on):
    """The step exported and compiled by AOTInductor for CUDA (Triton kernels included)."""
    from torch._inductor import aoti_load_package

    from asd_deploy import kernels
    from export.aoti_export import export_aoti
    from export.spec import sample_step_inputs, step_spec

    kernels.prepare("cuda")
    pkg = export_aoti(step_spec(cuda_model), tmp_path / "step.pt2")[0]
    step = aoti_load_package(str(pkg))
    inputs = sample_step_inputs(cuda_model.config, 1, device="cuda", seed=2)
    with torch.no_grad():
        ref = cuda_model.forward_step(*inputs)
    for a, b in zip(step(*inputs), ref):
        assert_close(a, b, 1e-4, "AOTI CUDA package vs eager")


ORT_CUDA = False
try:
    import onnxruntime
    ORT_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
except ImportError:
    pass


@pytest.mark.skipif(not ORT_CUDA, reason="needs onnxruntime-gpu (CUDAExecutionProvider)")
@pytest.mark.parametrize("opset", [18, 23])
def test_ort_cuda_matches_eager_every_run(tmp_path, opset):
    """ORT on CUDA with I/O binding: 5-chunk videos against eager, three runs (a stream race
    would make runs differ), every node on the GPU (no CPU fallback)."""
    pytest.importorskip("onnxscript", reason="the ONNX export needs onnx and onnxscript")
    from asd_deploy.backends import make_backend
    from asd_deploy.registry import load_dit
    from export.build import build

    folder = build(backend="ort", opset=opset, out=tmp_path, log=lambda m: None)
    loaded = load_dit("default", device="cuda")
    step = make_backend("ort", loaded, engine=folder, cpu_fallback=False)
    assert step.device.type == "cuda" and step.providers[0] == "CUDAExecutionProvider"
    ctx = torch.randn(1, loaded.config.text_len, loaded.config.text_dim, device="cuda")
    ref = _video(EagerStep(loaded.model), ctx, num_chunks=5, seed=0)
    runs = [_video(step, ctx, num_chunks=5, seed=0) for _ in range(3)]
    for v in runs:
        assert_close(v, ref, 1e-3, f"ORT CUDA opset {opset} vs eager")
    assert all(torch.equal(runs[0], v) for v in runs[1:]), "ORT CUDA runs differ: a stream race"


def test_pipeline_generates_on_cuda_with_whole_chunk_graphs():
    """The embedded default model end to end on CUDA: DiT in whole-chunk CUDA graphs, VAE decode."""
    pytest.importorskip("diffusers", reason="the pipeline's VAE needs diffusers")
    pytest.importorskip("safetensors", reason="the default model's weights need safetensors")
    from asd_deploy.backends.graphs import CudaGraphAPI, GraphedStep
    from asd_deploy.pipeline import Pipeline

    # the prompt goes through the shipped grammar encoder: nothing beyond the base install
    pipe = Pipeline.from_pretrained("default", device="cuda")
    api = CudaGraphAPI()
    pipe.step = GraphedStep(pipe.step, api)
    video, stream = pipe("a red circle moving right", steps=1, ffe=True, seed=0, frames=33)
    assert video.shape[0] == 33 and stream.stats.summary(pipe.fps)["dit_s"] > 0
    assert api.captures >= 1 and api.replays >= 3, (api.captures, api.replays)
    assert float(torch.as_tensor(video).float().std()) > 0, "a constant video"
