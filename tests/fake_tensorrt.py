"""A stand-in `tensorrt` module with TensorRT 11's build API surface, for CPU tests of the build code.

It has what TensorRT 11 has and nothing it removed (no `BuilderFlag.FP16`/`BF16`/`INT8`, no
weak typing), records every builder call in `calls`, parses ONNX files with the `onnx` package
and rejects the operators in `UNSUPPORTED` (as a TensorRT older than 10.14 rejects `Attention`);
the builder fails (returns None) on graphs holding an operator in `NO_IMPLEMENTATION`.
Timing caches whose bytes start with b"stale" are refused by `set_timing_cache` (returns False),
as TensorRT refuses one from another version or GPU. It builds nothing: the "engine" is a
description of what was asked. Not a runtime (no Runtime, no engines to execute).
"""
import builtins
import enum
import json

__version__ = "11.4.0.106"
UNSUPPORTED: set = set()
# parsed, but the builder finds no kernel for them ("no implementation"): build returns None, as
# an fp32 build of a fused `Attention` may
NO_IMPLEMENTATION: set = set()
calls: list = []


class DataType:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"DataType.{self.name}"


float32, float16, bfloat16, int64, int32, bool = (DataType(n) for n in
                                                   ("FLOAT", "HALF", "BF16", "INT64", "INT32", "BOOL"))
_ONNX = {1: float32, 10: float16, 16: bfloat16, 7: int64, 6: int32, 9: bool}


class Logger:
    WARNING = 2

    def __init__(self, level=WARNING):
        self.level = level


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 0  # deprecated and ignored in 11.x, still accepted


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):  # 11.x: the precision flags are gone
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 6
    SPARSE_WEIGHTS = 7


class _Tensor:
    def __init__(self, name, dtype, shape):
        self.name, self.dtype, self.shape = name, dtype, shape


class _Network:
    def __init__(self, flags):
        self.flags = flags
        self._inputs = []
        self._ops = set()

    @property
    def num_inputs(self):
        return len(self._inputs)

    def get_input(self, i):
        return self._inputs[i]


class _ParserError:
    def __init__(self, op, node, desc):
        self._op, self._node, self._desc = op, node, desc

    def node_operator(self):
        return self._op

    def node_name(self):
        return self._node

    def desc(self):
        return self._desc


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self._errors = network, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, i):
        return self._errors[i]

    def parse_from_file(self, path):
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
        self._errors = [_ParserError(n.op_type, n.name, f"no importer registered for op: {n.op_type}")
                        for n in nodes if n.op_type in UNSUPPORTED]
        calls.append(("parse", str(path), not self._errors))
        if self._errors:
            return False
        self.network._ops = {n.op_type for n in nodes}
        for i in model.graph.input:
            t = i.type.tensor_type
            self.network._inputs.append(_Tensor(i.name, _ONNX[t.elem_type], tuple(d.dim_value for d in t.shape.dim)))
        return True


class _TimingCache:
    def __init__(self, data):
        self.data = bytes(data)

    def serialize(self):
        return memoryview(b"timing-cache " + __version__.encode())


class _Config:
    def __init__(self):
        self.flags = {BuilderFlag.TF32}  # on by default, as in TensorRT
        self.cache = None

    def set_memory_pool_limit(self, pool, size):
        calls.append(("set_memory_pool_limit", pool, size))

    def set_flag(self, flag):
        calls.append(("set_flag", flag))
        self.flags.add(flag)

    def clear_flag(self, flag):
        calls.append(("clear_flag", flag))
        self.flags.discard(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def create_timing_cache(self, data):
        return _TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        ok = not cache.data.startswith(b"stale")
        calls.append(("set_timing_cache", cache.data[:5], ok))
        if ok:
            self.cache = cache
        return ok

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        calls.append(("create_network", flags))
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def build_serialized_network(self, network, config):
        desc = {"inputs": {t.name: [t.dtype.name, list(t.shape)] for t in network._inputs},
                "strongly_typed": builtins.bool(network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)),
                "tf32": BuilderFlag.TF32 in config.flags}
        calls.append(("build", desc))
        if network._ops & NO_IMPLEMENTATION:
            return None
        return memoryview(json.dumps(desc).encode())
