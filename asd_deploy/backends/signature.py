"""The engine I/O contract: input/output names, static shapes and dtypes of the two graphs.

Owns: `TensorSpec`, `step_signature` and `cross_kv_signature` (derived from a `ModelConfig`, a
batch size and a dtype) and the precision names. Both sides read it: `export/` traces graphs
with exactly these names and shapes, and every runtime checks its inputs and its manifest
against it. Does not own the wrapper modules or sample inputs (`export/spec.py`).

Graphs:
  step:     x [B, C, Fc, H, W], t [B, Fc], cross_k/v [layers, B, text_len, H, D],
            cache_k/v [layers, B, cache_tokens, H, D], frame_index int64 [B], cache_len int64 [B]
            -> flow [B, C, Fc, H, W], k_new/v_new [layers, B, tokens_per_chunk, H, D]
            (positions per sample, so one call serves streams at different frames; a caller's
            [1] positions are broadcast to [B] by the runtimes, see `broadcast_positions`)
  cross_kv: context [B, text_len, text_dim] -> cross_k/v [layers, B, text_len, H, D]
Floating tensors are in the engine's precision; positions are int64 device tensors, never baked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

STEP_INPUTS = ("x", "t", "cross_k", "cross_v", "cache_k", "cache_v", "frame_index", "cache_len")
STEP_OUTPUTS = ("flow", "k_new", "v_new")
CROSS_KV_INPUTS = ("context",)
CROSS_KV_OUTPUTS = ("cross_k", "cross_v")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "float16", "bfloat16", "int64"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)} {self.dtype}"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {"inputs": {s.name: s.to_dict() for s in self.inputs},
                "outputs": {s.name: s.to_dict() for s in self.outputs}}


def step_signature(config: ModelConfig, batch: int = 1, dtype: torch.dtype = torch.float32) -> Signature:
    f = dtype_name(dtype)
    kv_new = (config.num_layers, batch, config.tokens_per_chunk, config.num_heads, config.head_dim)
    shapes = (config.chunk_shape(batch), (batch, config.frames_per_chunk), config.cross_shape(batch),
              config.cross_shape(batch), config.cache_shape(batch), config.cache_shape(batch), (batch,), (batch,))
    dtypes = (f,) * 6 + ("int64", "int64")
    return Signature(tuple(TensorSpec(n, tuple(s), d) for n, s, d in zip(STEP_INPUTS, shapes, dtypes)),
                     tuple(TensorSpec(n, tuple(s), f) for n, s in
                           zip(STEP_OUTPUTS, (config.chunk_shape(batch), kv_new, kv_new))))


def cross_kv_signature(config: ModelConfig, batch: int = 1, dtype: torch.dtype = torch.float32) -> Signature:
    f = dtype_name(dtype)
    return Signature((TensorSpec("context", (batch, config.text_len, config.text_dim), f),),
                     tuple(TensorSpec(n, tuple(config.cross_shape(batch)), f) for n in CROSS_KV_OUTPUTS))


def signatures(config: ModelConfig, batch: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, Signature]:
    return {"step": step_signature(config, batch, dtype), "cross_kv": cross_kv_signature(config, batch, dtype)}


def check_inputs(where: str, specs: tuple[TensorSpec, ...], tensors, device: torch.device):
    """Raise naming the first input whose shape, dtype or device differs from the static spec."""
    for s, a in zip(specs, tensors):
        if tuple(a.shape) != s.shape or a.dtype != s.torch_dtype or a.device.type != device.type:
            raise ValueError(f"{where}: input {s.name!r} must be {list(s.shape)} {s.dtype} on {device} (static "
                             f"shapes of the engine); got {list(a.shape)} {dtype_name(a.dtype)} on {a.device}")


def broadcast_positions(args: tuple, batch: int) -> tuple:
    """Step arguments with [1] positions (a lockstep `KVCache`) expanded to the engine's [batch]."""
    if batch == 1:
        return args
    *rest, frame_index, cache_len = args
    return (*rest, *(p.expand(batch) if p.ndim == 1 and p.shape[0] == 1 else p for p in (frame_index, cache_len)))
