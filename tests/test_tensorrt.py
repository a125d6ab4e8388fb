"""TensorRT path: on this machine it must fail cleanly, naming what is missing. The engine-vs-eager
check needs a GPU with TensorRT and is skipped (with the reason) everywhere else: not run here."""
import importlib.util

import pytest
import torch

from asd_deploy.tensorrt_engine import check_trt_available, engine_name

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAVE_TRT, reason="checks the missing-TensorRT error; TensorRT and a GPU are present")
def test_missing_trt_or_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError) as e:
        check_trt_available()
    msg = str(e.value)
    assert "TensorRT backend unavailable" in msg and "pip install .[gpu]" in msg


def test_engine_name_encodes_version_gpu_shapes_precision():
    n = engine_name("10.15.1", "sm90", "tiny-b1-c3x4x6-k9", "fp16")
    assert n == "step-trt10.15.1-sm90-tiny-b1-c3x4x6-k9-fp16.engine"


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and a CUDA GPU (neither here; not run in this project's CI)")
def test_trt_engine_matches_eager(tmp_path):
    """fp32 TensorRT engine (with its CUDA graph) against eager on the GPU, a 5-chunk video."""
    from asd_deploy.backends import make_backend
    from asd_deploy.generator import EagerStep, generate
    from asd_deploy.graphs import GraphedStep
    from asd_deploy.registry import load_dit
    from export.build import build

    loaded = load_dit("default", device="cuda")
    folder = build(backend="trt", precision="fp32", out=tmp_path, log=lambda m: None)
    trt_step = make_backend("trt", loaded, engine=folder)
    ctx = torch.randn(1, loaded.config.text_len, loaded.config.text_dim, device="cuda")
    ref = torch.cat(list(generate(EagerStep(loaded.model), ctx, num_chunks=5, seed=0)), 2)
    for step in (trt_step, GraphedStep(trt_step)):
        out = torch.cat(list(generate(step, ctx, num_chunks=5, seed=0)), 2)
        assert (out - ref).abs().max().item() < 1e-3
