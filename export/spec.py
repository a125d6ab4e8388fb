"""Export specs: what each network is traced as, kept apart from the nn.Module.

Owns: `ExportSpec` (a wrapper module that is a pure function of its named inputs, the static
signature from `asd_deploy.backends.signature`, sample inputs, and the attention implementation
to trace with), `step_spec` / `cross_kv_spec`, and the `sdpa_mask4d` attention used for ONNX
opset >= 23. Does not own the model (`asd_deploy/model.py`) or any exporter call.

Rules the wrappers keep: the KV cache is an input and the chunk's new keys/values are outputs;
positions (`frame_index`, `cache_len`) are int64 inputs; the wrappers hold no buffers (exporters
silently bake or drop in-place buffer updates). Only parameters become constants.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

import asd_deploy.model as model_lib
from asd_deploy.backends.signature import Signature, cross_kv_signature, step_signature
from asd_deploy.config import ModelConfig


def attention_sdpa_mask4d(q, k, v, mask):
    """SDPA with the boolean mask expanded to [B, 1, Lq, Lk].

    The step's mask is [1, 1, 1, Lk] (broadcast over queries). Opset 23 exports SDPA as the fused
    `Attention` op, and ONNX Runtime's CPU kernel (1.32) rejects a mask whose query dim is not
    Lq ("inconsistent q_sequence_length"), so the export graph spells the broadcast out. Same
    values as `attention_sdpa`."""
    if mask is not None:
        mask = mask.expand(q.shape[0], 1, q.shape[1], k.shape[1])
    return model_lib.attention_sdpa(q, k, v, mask)


model_lib.ATTENTION.setdefault("sdpa_mask4d", attention_sdpa_mask4d)


@contextlib.contextmanager
def attention_impl(name: str):
    """Trace with `model.attention_impl = name` (the model's module-level switch), then restore."""
    if name not in model_lib.ATTENTION:
        raise ValueError(f"unknown attention implementation {name!r}; known: {sorted(model_lib.ATTENTION)}")
    old, model_lib.attention_impl = model_lib.attention_impl, name
    try:
        yield
    finally:
        model_lib.attention_impl = old


class StepGraph(nn.Module):
    """The chunk step as a module whose forward is `forward_step` (8 inputs -> 3 outputs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        return self.model.forward_step(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)


class CrossKVGraph(nn.Module):
    """Per-prompt cross-attention keys/values: context -> (cross_k, cross_v)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, context):
        return self.model.cross_kv(context)


@dataclass
class ExportSpec:
    name: str                       # "step" | "cross_kv": also the artifact stem
    module: nn.Module               # pure wrapper, eval mode
    signature: Signature
    sample_inputs: tuple[torch.Tensor, ...]
    attention: str = "sdpa"         # model.attention_impl while tracing

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.signature.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.signature.outputs]

    def tracing(self):
        return attention_impl(self.attention)


def _dtype_device(model) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


def sample_step_inputs(config: ModelConfig, batch: int = 1, dtype=torch.float32, device="cpu",
                       seed: int = 0, cached_chunks: int | None = None) -> tuple[torch.Tensor, ...]:
    """Plausible step inputs: random chunk, t = 500, random cross K/V and cache, with the cache
    holding `cached_chunks` valid chunks (default: all but one, so the mask matters). With
    batch > 1 sample b holds `cached_chunks - b` chunks (at least 0), so the per-sample positions
    [B] differ from each other, as batched streams' do."""
    g = torch.Generator().manual_seed(seed)
    n = config.cache_chunks - 1 if cached_chunks is None else cached_chunks
    chunks = [max(0, n - b) for b in range(batch)]

    def rnd(shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    return (rnd(config.chunk_shape(batch)),
            torch.full((batch, config.frames_per_chunk), 500.0, dtype=dtype, device=device),
            rnd(config.cross_shape(batch)), rnd(config.cross_shape(batch)),
            rnd(config.cache_shape(batch)), rnd(config.cache_shape(batch)),
            torch.tensor([c * config.frames_per_chunk for c in chunks], dtype=torch.long, device=device),
            torch.tensor([c * config.tokens_per_chunk for c in chunks], dtype=torch.long, device=device))


def sample_context(config: ModelConfig, batch: int = 1, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.text_len, config.text_dim, generator=g).to(device=device, dtype=dtype)


def step_spec(model, batch: int = 1, mask_4d: bool = False) -> ExportSpec:
    """The chunk step; `mask_4d` for exporters that lower SDPA to ONNX `Attention` (opset >= 23)."""
    dtype, device = _dtype_device(model)
    cfg = model.config
    return ExportSpec("step", StepGraph(model).eval(), step_signature(cfg, batch, dtype),
                      sample_step_inputs(cfg, batch, dtype, device), "sdpa_mask4d" if mask_4d else "sdpa")


def cross_kv_spec(model, batch: int = 1) -> ExportSpec:
    dtype, device = _dtype_device(model)
    cfg = model.config
    return ExportSpec("cross_kv", CrossKVGraph(model).eval(), cross_kv_signature(cfg, batch, dtype),
                      (sample_context(cfg, batch, dtype, device),))


def export_specs(model, batch: int = 1, opset: int | None = None) -> list[ExportSpec]:
    """Both graphs of an engine."""
    return [step_spec(model, batch, mask_4d=opset is not None and opset >= 23), cross_kv_spec(model, batch)]


# ---- decoders -----------------------------------------------------------------------------------
class DecodeFirstGraph(nn.Module):
    """A decode net's first chunk: latents -> (video, *caches)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, latents):
        video, caches = self.net.first(latents)
        return (video, *caches)


class DecodeNextGraph(nn.Module):
    """A decode net's later chunks: (latents, *caches) -> (video, *new caches)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, latents, *caches):
        video, new = self.net.next(latents, caches)
        return (video, *new)


def decoder_specs(net, config: ModelConfig, batch: int = 1, seed: int = 0) -> list[ExportSpec]:
    """`decode_first` and `decode_next` of a decode net (`asd_deploy.decoders`, fp32) for chunks
    of the model's frames_per_chunk latent frames; sample caches are random (any values trace)."""
    from asd_deploy.decoders.engine import decode_signatures

    g = torch.Generator().manual_seed(seed)
    h, w, f = config.latent_height, config.latent_width, config.frames_per_chunk
    sigs = decode_signatures(net, batch, f, h, w)
    lat = torch.randn(batch, net.z_dim, f, h, w, generator=g)
    caches = tuple(torch.randn(s, generator=g) for s in net.cache_shapes(batch, h, w))
    return [ExportSpec("decode_first", DecodeFirstGraph(net).eval(), sigs["decode_first"], (lat,)),
            ExportSpec("decode_next", DecodeNextGraph(net).eval(), sigs["decode_next"], (lat, *caches))]
