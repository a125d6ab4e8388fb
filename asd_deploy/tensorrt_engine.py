"""TensorRT: build an engine from the exported ONNX chunk step, and run it behind the chunk-step
signature with the KV cache bound in place.

Owns: `check_trt_available`, `engine_name`, `build_trt_engine` (static shapes, fp16/bf16 flags,
a persistent timing cache, atomic writes) and `TRTStep` (device buffers allocated once, inputs
bound by address, `execute_async_v3` on the current torch CUDA stream, so `GraphedStep` can
capture it in a CUDA graph by stream capture). Does not own ONNX export (`export/`).

NOT RUN HERE: this machine and CI have no GPU and TensorRT cannot be installed from PyPI here
(only stubs). The code follows the TensorRT 10 Python API documentation; it is reachable from
`export.build --backend trt` and `generate --backend trt`, which fail with a clear message
naming what is missing. `tensorrt` is imported only inside this module's functions.
"""
from __future__ import annotations

from pathlib import Path

import torch

INSTALL_HINT = "install the GPU extra on a CUDA machine: pip install .[gpu]  (TensorRT >= 10.14, cuda-python)"


def check_trt_available():
    """Import tensorrt and check for a CUDA GPU; raise naming what is missing and what to do."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError(f"TensorRT backend unavailable: the 'tensorrt' package is not installed ({e}); "
                           f"{INSTALL_HINT}") from None
    if not hasattr(trt, "Builder"):
        raise RuntimeError(f"TensorRT backend unavailable: 'tensorrt' {getattr(trt, '__version__', '?')} is a stub "
                           f"package without the runtime; {INSTALL_HINT}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"TensorRT backend unavailable: no CUDA GPU is visible (torch.cuda.is_available() is "
                           f"False); TensorRT engines build and run only on NVIDIA GPUs. {INSTALL_HINT}")
    return trt


def gpu_tag() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def engine_name(trt_version: str, gpu: str, shapes_key: str, precision: str) -> str:
    """Engines run only on the TensorRT version and GPU architecture that built them."""
    return f"step-trt{trt_version}-{gpu}-{shapes_key}-{precision}.engine"


def _atomic_bytes(path: Path, data: bytes):
    from .checkpoint import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def build_trt_engine(onnx_path, engine_path, precision: str = "fp16", timing_cache=None,
                     workspace_gib: float = 8.0) -> Path:
    """Static-shape engine from ONNX. fp16/bf16 set the builder flags (normalization layers
    stay in fp32 where the parser maps LayerNormalization, opset >= 17)."""
    trt = check_trt_available()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    flags = {"fp32": None, "fp16": trt.BuilderFlag.FP16, "bf16": trt.BuilderFlag.BF16}
    if precision not in flags:
        raise ValueError(f"precision must be one of {sorted(flags)}; got {precision!r}")
    if flags[precision] is not None:
        config.set_flag(flags[precision])
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path = Path(engine_path)
    _atomic_bytes(engine_path, bytes(serialized))
    if cache_path:
        _atomic_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return engine_path


class TRTStep:
    """A TensorRT engine behind the chunk-step signature.

    Output buffers are allocated once; every input (the chunk, timesteps, cross k/v, the cache
    buffers, the positions) is bound by address, so the cache is read in place, never copied.
    Outputs are reused by the next call: consume them first (as the loop does)."""
    name = "trt"
    from .backends.signature import STEP_INPUTS as INPUTS, STEP_OUTPUTS as OUTPUTS  # the exported names

    def __init__(self, engine_path, config, cross_kv_fn, expect: dict | None = None):
        trt = check_trt_available()
        if expect:
            found = {"trt_version": trt.__version__, "gpu": gpu_tag()}
            bad = {k: (v, found[k]) for k, v in expect.items() if k in found and found[k] != v}
            if bad:
                raise RuntimeError(f"engine {engine_path} was built for {({k: v[0] for k, v in bad.items()})}, this "
                                   f"machine has {({k: v[1] for k, v in bad.items()})}; rebuild it here: "
                                   f"python -m export.build --backend trt --force")
        self.config, self.device, self.dtype = config, torch.device("cuda"), torch.float32
        self._cross_kv = cross_kv_fn
        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {engine_path} (truncated, or another TensorRT version); "
                               f"rebuild: python -m export.build --backend trt --force")
        self.context = self.engine.create_execution_context()
        dt = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
              trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
        self.outputs = {n: torch.empty(tuple(self.engine.get_tensor_shape(n)), dtype=dt[self.engine.get_tensor_dtype(n)],
                                       device="cuda") for n in self.OUTPUTS}
        for n, buf in self.outputs.items():
            self.context.set_tensor_address(n, buf.data_ptr())
        self.input_dtypes = {n: dt[self.engine.get_tensor_dtype(n)] for n in self.INPUTS}

    def cross_kv(self, context):
        return self._cross_kv(context)

    def __call__(self, *inputs):
        for name, tensor in zip(self.INPUTS, inputs):
            if tensor.dtype != self.input_dtypes[name] or not tensor.is_cuda or not tensor.is_contiguous():
                raise ValueError(f"TensorRT input {name!r} must be a contiguous CUDA {self.input_dtypes[name]} tensor; "
                                 f"got {tensor.dtype} on {tensor.device}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return tuple(self.outputs[n] for n in self.OUTPUTS)
