"""TensorRT backend: an engine folder from `export.build --backend trt` as a chunk step.

NOT RUN HERE: this machine and CI have no GPU and no TensorRT. The step runs through
`tensorrt_engine.TRTStep` (device buffers allocated once, cache bound in place,
`execute_async_v3`); the per-prompt cross K/V graph runs once per prompt through ONNX Runtime
and is moved to the GPU. Every entry point first names what is missing (`check_trt_available`).
"""
from __future__ import annotations

from pathlib import Path


def require_trt():
    """Raise naming what is missing (the tensorrt package, a CUDA GPU) and what to install."""
    from ..tensorrt_engine import check_trt_available

    check_trt_available()


def load_trt_engine(engine_dir, manifest, config, **options):
    import onnxruntime as ort
    import torch

    from ..tensorrt_engine import TRTStep

    require_trt()
    engine_dir = Path(engine_dir)
    sess = ort.InferenceSession(str(engine_dir / manifest["runtime"]["cross_kv"]), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def cross_kv(context):
        k, v = sess.run(None, {name: context.detach().float().cpu().numpy()})
        return torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda()

    return TRTStep(engine_dir / manifest["runtime"]["step"], config, cross_kv,
                   expect={"trt_version": manifest.get("trt_version"), "gpu": manifest.get("gpu")})
