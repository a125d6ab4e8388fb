"""TensorRT path. On this machine: the missing-TensorRT error, the engine names, and the build
code (`export.build --backend trt`) run against `fake_tensorrt`, a stand-in with TensorRT 11's
API surface. The engine-vs-eager checks need a GPU with TensorRT and are `gpu`-marked (not run
here)."""
import importlib.util
import json
import sys

import pytest
import torch

import fake_tensorrt
from asd_deploy.backends import trt as trt_backend
from asd_deploy.backends.trt import check_trt_available, engine_name, timing_cache_name

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAVE_TRT, reason="checks the missing-TensorRT error; TensorRT and a GPU are present")
def test_missing_trt_or_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError) as e:
        check_trt_available()
    msg = str(e.value)
    assert "TensorRT backend unavailable" in msg and "pip install .[gpu]" in msg and "gpu-cu12" in msg


def test_engine_and_timing_cache_names_encode_version_gpu_shapes_precision():
    n = engine_name("10.15.1", "sm90", "tiny-b1-c3x4x6-k9", "fp16")
    assert n == "step-trt10.15.1-sm90-tiny-b1-c3x4x6-k9-fp16.engine"
    assert engine_name("10.15.1", "sm90", "k", "fp32", graph="cross_kv").startswith("cross_kv-trt10.15.1-sm90")
    assert timing_cache_name("11.4.0.106", "sm90") == "timing-trt11.4.0.106-sm90.cache"


@pytest.fixture
def fake_trt(monkeypatch):
    """`import tensorrt` gives the stand-in, and the TensorRT backend sees a GPU (sm90); the rest
    of torch still sees none (the ONNX exporter must not try CUDA)."""
    fake_tensorrt.calls.clear()
    monkeypatch.setattr(fake_tensorrt, "UNSUPPORTED", set())
    monkeypatch.setattr(fake_tensorrt, "NO_IMPLEMENTATION", set())
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(trt_backend, "check_trt_available", lambda: fake_tensorrt)
    monkeypatch.setattr(trt_backend, "gpu_tag", lambda: "sm90")
    return fake_tensorrt


def test_engine_device_carries_its_index(monkeypatch):
    """Input tensors report cuda:N; a bare "cuda" engine device never equals that, so every input
    check (and the build's validation) would fail on a GPU. The engine keeps the indexed device."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert trt_backend.indexed_cuda_device("cuda") == torch.device("cuda", 0)
    assert trt_backend.indexed_cuda_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert torch.device("cuda") != torch.device("cuda", 0)  # the trap itself


def test_trt_step_results_survive_the_next_call():
    """The engine reuses its output buffers; a stream's results must not change when another
    stream (another thread) runs the step next, and calls never overlap on one context."""
    import threading
    import time

    class Engine:  # the TRTEngine contract: the same output buffers every run
        def __init__(self):
            self.outputs, self.running = (torch.zeros(2), torch.zeros(2), torch.zeros(2)), 0

        def run(self, inputs):
            self.running += 1
            assert self.running == 1, "two calls inside one execution context"
            time.sleep(0.01)
            for o in self.outputs:
                o.fill_(float(inputs[0]))
            self.running -= 1
            return self.outputs

    step = object.__new__(trt_backend.TRTStep)
    step._step, step._cross, step._lock = Engine(), Engine(), threading.Lock()
    first = step(torch.tensor(1.0), *[None] * 7)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, step(torch.tensor(float(i)), *[None] * 7)))
               for i in range(2, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o, torch.ones(2)) for o in first)
    assert all(torch.equal(results[i][0], torch.full((2,), float(i))) for i in range(2, 6))


@pytest.mark.slow
def test_trt_build_is_strongly_typed_without_tf32_and_falls_back_to_opset_18(fake_trt, tmp_path):
    """fp32 build against TensorRT 11's API: a strongly typed network, no precision flag set,
    TF32 cleared; a parser without `Attention` gets the opset-18 step graph (cross_kv has none
    and stays at 23); a stale timing cache is replaced, not trusted; both graphs become engines."""
    from export.build import build

    fake_trt.UNSUPPORTED = {"Attention"}
    (tmp_path / timing_cache_name(fake_trt.__version__, "sm90")).write_bytes(b"stale cache of another version")
    logs = []
    folder = build(config="tiny", checkpoint="random", backend="trt", precision="fp32", out=tmp_path,
                   validate=False, log=logs.append)
    m = json.loads((folder / "manifest.json").read_text())
    assert m["opset"] == 23 and m["trt_onnx_opset"] == {"step": 18, "cross_kv": 23}
    assert m["device"] == "cuda" and m["trt_version"] == fake_trt.__version__
    assert set(m["runtime"]) == {"step", "cross_kv"} and all(v.endswith(".engine") for v in m["runtime"].values())
    builds = [c[1] for c in fake_trt.calls if c[0] == "build"]
    assert len(builds) == 2 and all(b["strongly_typed"] and not b["tf32"] for b in builds)
    assert not [c for c in fake_trt.calls if c[0] == "set_flag"]
    assert ("set_timing_cache", b"stale", False) in fake_trt.calls
    assert (tmp_path / timing_cache_name(fake_trt.__version__, "sm90")).read_bytes().startswith(b"timing-cache")
    assert any("rejects ['Attention'] at opset 23" in line for line in logs)
    step_inputs = builds[0]["inputs"]
    assert step_inputs["x"][0] == "FLOAT" and step_inputs["cache_len"] == ["INT64", [1]]


@pytest.mark.slow
def test_trt_build_without_a_kernel_for_fused_attention_falls_back_to_opset_18(fake_trt, tmp_path):
    """The parser takes `Attention` but the builder makes no engine of it (no fp32 kernel): the
    step is rebuilt from the opset-18 graph; cross_kv (no Attention) stays at 23."""
    from export.build import build

    fake_trt.NO_IMPLEMENTATION = {"Attention"}
    logs = []
    folder = build(config="tiny", checkpoint="random", backend="trt", precision="fp32", out=tmp_path,
                   validate=False, log=logs.append)
    m = json.loads((folder / "manifest.json").read_text())
    assert m["trt_onnx_opset"] == {"step": 18, "cross_kv": 23}
    assert any("built no engine of step at opset 23" in line for line in logs)
    assert sum(c[0] == "build" for c in fake_trt.calls) == 3  # step at 23 (failed), step at 18, cross_kv


def test_trt_build_refuses_a_graph_in_another_precision(fake_trt, tmp_path):
    """A strongly typed engine takes the graph's dtypes: an fp32 graph asked to be fp16 is an error."""
    from asd_deploy.config import ModelConfig
    from asd_deploy.model import build_model
    from export.onnx_export import export_onnx
    from export.spec import cross_kv_spec

    onnx_path = tmp_path / "cross_kv.onnx"
    export_onnx(cross_kv_spec(build_model(ModelConfig.preset("tiny"))), onnx_path, 18)
    with pytest.raises(ValueError, match="input 'context' is torch.float32, the engine was asked for fp16"):
        trt_backend.build_trt_engine(onnx_path, tmp_path / "x.engine", "fp16")
    trt_backend.build_trt_engine(onnx_path, tmp_path / "x.engine", "fp32")
    assert (tmp_path / "x.engine").exists()


def test_parser_rejection_names_the_operators(fake_trt, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Attention", ["q", "q", "q"], ["y"], name="attn0")], "g",
                          [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]), tmp_path / "a.onnx")
    fake_trt.UNSUPPORTED = {"Attention"}
    with pytest.raises(trt_backend.TRTParseError, match="Attention attn0: no importer") as e:
        trt_backend.build_trt_engine(tmp_path / "a.onnx", tmp_path / "a.engine", "fp32")
    assert e.value.ops == {"Attention"}


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and a CUDA GPU (neither here; not run in this project's CI)")
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("fp16", 5e-2), ("bf16", 2e-1)])
def test_trt_engine_matches_eager(tmp_path, precision, tol):
    """TensorRT engines (validated by the build on the GPU) against eager CUDA, a 5-chunk video,
    plain and in whole-chunk CUDA graphs (relative to max |ref|)."""
    from asd_deploy.backends import make_backend
    from asd_deploy.backends.graphs import GraphedStep
    from asd_deploy.generator import EagerStep, generate
    from asd_deploy.registry import load_dit
    from export.build import build

    loaded = load_dit("default", device="cuda")
    folder = build(backend="trt", precision=precision, out=tmp_path, log=lambda m: None)
    trt_step = make_backend("trt", loaded, engine=folder, precision=precision)
    assert trt_step.device.type == "cuda" and trt_step.dtype == {"fp32": torch.float32, "fp16": torch.float16,
                                                                 "bf16": torch.bfloat16}[precision]
    ctx = torch.randn(1, loaded.config.text_len, loaded.config.text_dim, device="cuda")
    ref = torch.cat(list(generate(EagerStep(loaded.model), ctx, num_chunks=5, seed=0)), 2)
    for step in (trt_step, GraphedStep(trt_step)):
        out = torch.cat(list(generate(step, ctx, num_chunks=5, seed=0)), 2)
        err = (out - ref).abs().max().item()
        assert err <= tol * max(1.0, ref.abs().max().item()), f"{step.name}: max abs error {err:.3e}"
