"""TensorRT: engines built from the exported ONNX graphs, run behind the chunk-step signature.

Owns: `check_trt_available` / `require_trt` (what is missing, and what to install),
`engine_name`, `build_trt_engine`, `TRTEngine` (one deserialized engine), `TRTStep` (the step and
cross_kv engines as a chunk step) and `load_trt_engine` (an engine folder). Does not own ONNX
export or the build stages (`export/`).

Written to the TensorRT 10.x / 11.x Python API:
  - strongly typed networks (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`; TensorRT 11 accepts
    and ignores it): every tensor's type comes from the ONNX graph, which `export.build` writes
    in the engine's precision with fp32 casts around the norms. No precision builder flags (11.x
    removed them); for fp32 engines TF32 (on by default) is cleared, so "fp32" means fp32.
  - the tensor-name API (`num_io_tensors`, `get_tensor_name/mode/shape/dtype`,
    `set_tensor_address`, `execute_async_v3`); I/O names, shapes and dtypes are checked against
    the engine signature at load and every input at every call (a wrong shape would read out of
    bounds, not fail).
  - a dedicated CUDA stream per engine that waits on torch's current stream and is waited on by
    it (never the legacy default stream); inside a CUDA-graph capture the capturing stream.
  - a timing cache per TensorRT version and GPU, whose `set_timing_cache` result is checked.
Output buffers are allocated once and reused by the next call (consume them first, as the loop
does); inputs are bound by address, so the KV cache is read in place. The per-prompt cross K/V
run as their own engine on the GPU.

NOT RUN HERE: no GPU and no TensorRT on this project's machines (PyPI's `tensorrt` needs an
index we cannot reach). `tests/test_tensorrt.py` runs the build code against a stand-in module
with TensorRT 11's API surface (no BuilderFlag.FP16, ...) and the engine-vs-eager check is
`gpu`-marked. `tensorrt` is imported only inside these functions.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..config import ModelConfig
from .manifest import EngineError
from .signature import Signature, check_inputs, precision_dtype, signatures

INSTALL_HINT = ("install TensorRT for your torch's CUDA major on a GPU machine: pip install .[gpu] (tensorrt-cu13), "
                "or .[gpu-cu12] for a CUDA 12 torch (README, GPU section)")


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


def require_trt():
    """Raise naming what is missing (the tensorrt package, a CUDA GPU) and what to install."""
    check_trt_available()


def gpu_tag() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def engine_name(trt_version: str, gpu: str, shapes_key: str, precision: str, graph: str = "step") -> str:
    """Engines run only on the TensorRT version and GPU architecture that built them."""
    return f"{graph}-trt{trt_version}-{gpu}-{shapes_key}-{precision}.engine"


def timing_cache_name(trt_version: str, gpu: str) -> str:
    """Timing caches are valid for one TensorRT version and GPU."""
    return f"timing-trt{trt_version}-{gpu}.cache"


class TRTParseError(RuntimeError):
    """The ONNX parser rejected the graph; `ops` names the operators it failed on."""

    def __init__(self, path, errors: list[tuple[str, str, str]]):
        self.ops = {op for op, _, _ in errors if op}
        detail = "; ".join(f"{op or '?'} {node}: {desc}" for op, node, desc in errors)
        super().__init__(f"TensorRT could not parse {path}: {detail}")


class TRTBuildError(RuntimeError):
    """The builder produced no engine from a parsed graph (e.g. no fp32 kernel for a fused op)."""


def _parser_errors(parser) -> list[tuple[str, str, str]]:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        out.append((e.node_operator(), e.node_name(), e.desc()))
    return out


def _atomic_bytes(path: Path, data):
    from ..checkpoint import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(memoryview(data)))  # no second host copy


def _torch_dtypes(trt) -> dict:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}


def build_trt_engine(onnx_path, engine_path, precision: str = "fp32", timing_cache=None,
                     workspace_gib: float = 8.0, log=None) -> Path:
    """A static-shape engine from an ONNX graph exported in `precision` (strongly typed: the
    graph's dtypes decide; `precision` clears TF32 for fp32 and is checked against the graph's
    floating inputs). Raises `TRTParseError` when the parser rejects an operator, `TRTBuildError`
    when the builder makes no engine of the parsed graph."""
    log = log or (lambda msg: None)
    dtype = precision_dtype(precision)
    trt = check_trt_available()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise TRTParseError(onnx_path, _parser_errors(parser))
    to_torch = _torch_dtypes(trt)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        got = to_torch.get(tensor.dtype)
        if got is not None and got.is_floating_point and got != dtype:
            raise ValueError(f"{onnx_path}: input {tensor.name!r} is {got}, the engine was asked for {precision}; "
                             f"export the graph in {precision} (export.build does)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if dtype == torch.float32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 matmuls would round inputs to 10 bits
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        data = cache_path.read_bytes() if cache_path.exists() else b""
        if not config.set_timing_cache(config.create_timing_cache(data), False):
            log(f"timing cache {cache_path} does not match this TensorRT/GPU; starting a new one")
            if not config.set_timing_cache(config.create_timing_cache(b""), False):
                raise RuntimeError("TensorRT refused an empty timing cache")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TRTBuildError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path = Path(engine_path)
    _atomic_bytes(engine_path, serialized)
    if cache_path is not None:
        _atomic_bytes(cache_path, config.get_timing_cache().serialize())
    return engine_path


def indexed_cuda_device(device) -> torch.device:
    """`device` with its index: tensors report `cuda:N`, and `torch.device("cuda")` never equals
    that, so an engine compares inputs against the indexed device (the current one when none)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class TRTEngine:
    """One engine: I/O checked against `signature`, outputs allocated once, a dedicated stream."""

    def __init__(self, path, signature: Signature, device="cuda"):
        trt = check_trt_available()
        self.path, self.signature, self.device = Path(path), signature, indexed_cuda_device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)  # kept: the runtime and engine refer to them
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"could not deserialize {self.path} (truncated, or another TensorRT version); "
                              f"rebuild: python -m export.build --backend trt --force")
        to_torch = _torch_dtypes(trt)
        eng = self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        got = {n: (tuple(eng.get_tensor_shape(n)), to_torch.get(eng.get_tensor_dtype(n)),
                   eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT) for n in names}
        want = {s.name: (s.shape, s.torch_dtype, True) for s in signature.inputs}
        want.update({s.name: (s.shape, s.torch_dtype, False) for s in signature.outputs})
        if got != want:
            raise EngineError(f"{self.path}: engine I/O {got} differs from the signature {want}; rebuild it: "
                              f"python -m export.build --backend trt --force")
        self.context = eng.create_execution_context()
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
        self.outputs = tuple(torch.empty(s.shape, dtype=s.torch_dtype, device=self.device) for s in signature.outputs)
        for s, buf in zip(signature.outputs, self.outputs):
            self.context.set_tensor_address(s.name, buf.data_ptr())
        self._where = f"TensorRT engine {self.path.name}"

    def run(self, inputs) -> tuple[torch.Tensor, ...]:
        check_inputs(self._where, self.signature.inputs, inputs, self.device)
        for s, a in zip(self.signature.inputs, inputs):
            if not a.is_contiguous() or a.device != self.device:
                raise ValueError(f"{self._where}: input {s.name!r} must be contiguous on {self.device}; got "
                                 f"strides {a.stride()} on {a.device}")
            self.context.set_tensor_address(s.name, a.data_ptr())
        current = torch.cuda.current_stream(self.device)
        if torch.cuda.is_current_stream_capturing():  # the capturing stream records it
            ok = self.context.execute_async_v3(current.cuda_stream)
        else:
            self.stream.wait_stream(current)          # inputs written on torch's stream are ready
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
            current.wait_stream(self.stream)          # torch's next reads see the outputs
        if not ok:
            raise RuntimeError(f"{self._where}: execute_async_v3 failed (see the TensorRT log)")
        return self.outputs


class TRTStep:
    """The step and cross_kv engines of an engine folder as a chunk step."""
    name = "trt"

    def __init__(self, engine_dir, manifest: dict, config: ModelConfig, device="cuda"):
        trt = check_trt_available()
        found = {"trt_version": trt.__version__, "gpu": gpu_tag()}
        bad = {k: (manifest.get(k), v) for k, v in found.items() if manifest.get(k) not in (None, v)}
        if bad:
            raise EngineError(f"engine {engine_dir} was built for {({k: v[0] for k, v in bad.items()})}, this machine "
                              f"has {({k: v[1] for k, v in bad.items()})}; rebuild it here: "
                              f"{manifest.get('rebuild', 'python -m export.build --backend trt --force')}")
        engine_dir = Path(engine_dir)
        self.config, self.batch = config, manifest["batch"]
        if torch.device(device).type != "cuda":
            raise ValueError(f"TensorRT engines run on a CUDA device; got {device}")
        self.device = indexed_cuda_device(device)
        self.dtype = precision_dtype(manifest["precision"])  # the engine's I/O, not always fp32
        sig = signatures(config, self.batch, self.dtype)
        rt = manifest["runtime"]
        self._step = TRTEngine(engine_dir / rt["step"], sig["step"], self.device)
        self._cross = TRTEngine(engine_dir / rt["cross_kv"], sig["cross_kv"], self.device)
        # one execution context and one set of output buffers per engine: concurrent streams
        # (Pipeline is thread-safe) take turns, and each gets its own copy of the outputs
        self._lock = threading.Lock()

    def cross_kv(self, context):
        with self._lock:
            k, v = self._cross.run((context.to(self.device, self.dtype).contiguous(),))
            return k.clone(), v.clone()  # its output buffers are reused by the next prompt

    def __call__(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        with self._lock:  # flow and the chunk's K/V: small beside the cache, copied out of the buffers
            return tuple(o.clone() for o in self._step.run((x, t, cross_k, cross_v, cache_k, cache_v, frame_index,
                                                             cache_len)))


def load_trt_engine(engine_dir, manifest, config, device=None, **options):
    if options:
        raise TypeError(f"the trt backend takes no options {sorted(options)}")
    return TRTStep(engine_dir, manifest, config, device=device if device not in (None, "cpu") else "cuda")
