"""TensorRT backend: placeholder. Not built here.

The TensorRT engine build and runtime are written in `asd_deploy/tensorrt_engine.py` (from the
TensorRT 10 docs, never run on this CPU machine); wiring them into `export.build --backend trt`
and `make_backend("trt", ...)` is another engineer's issue. Until then every entry point here
first names what this machine lacks (TensorRT, a CUDA GPU: `check_trt_available`) and then says
plainly that the wiring does not exist yet. Nothing here pretends to work.
"""
from __future__ import annotations

NOT_BUILT = ("TensorRT backend: not built here. The export.build stage that makes a TensorRT engine and its "
             "chunk-step runtime are not wired into asd_deploy.backends yet (asd_deploy/tensorrt_engine.py holds "
             "the untested build/runtime code). Use --backend ort or --backend aoti meanwhile.")


def require_trt():
    """Raise naming what is missing: TensorRT / a GPU (on machines without them), else the wiring."""
    from ..tensorrt_engine import check_trt_available

    try:
        check_trt_available()
    except RuntimeError as e:  # "TensorRT backend unavailable: <what is missing>; pip install .[gpu] ..."
        raise RuntimeError(f"{e}. Note: {NOT_BUILT}") from None
    raise NotImplementedError(NOT_BUILT)


def load_trt_engine(engine_dir, manifest, config, **options):
    require_trt()
