"""The autoregressive loop: chunk after chunk, a few denoising steps each, then the clean pass.

Owns: the chunk-step protocol every backend implements, `EagerStep` (the eager model behind
that protocol) and `generate`, which yields each chunk's clean latents as soon as it is done.
Does not own: how a step is computed (backends), decoding (vae.py), prompts (text.py).

The loop never asks which backend it has, never reads a tensor back to the host, and draws all
noise from one seeded `torch.Generator` in a fixed order, so a seed fixes the video.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import torch

from .cache import KVCache
from .config import ModelConfig
from .schedule import Schedule, flow_to_x0, renoise


class ChunkStep(Protocol):
    """What the loop needs from a backend (eager, compiled, ONNX Runtime, AOTInductor, TensorRT)."""
    config: ModelConfig
    dtype: torch.dtype
    device: torch.device

    def cross_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, text_len, text_dim] -> cross k, v [layers, B, text_len, H, D]."""

    def __call__(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        """-> flow [B, C, Fc, H, W], k_new, v_new [layers, B, tokens_per_chunk, H, D]."""


class EagerStep:
    """The eager PyTorch model as a chunk step."""
    name = "eager"

    def __init__(self, model):
        self.model = model.eval()
        self.config = model.config
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device

    @torch.no_grad()
    def cross_kv(self, context):
        return self.model.cross_kv(context.to(self.device, self.dtype))

    @torch.no_grad()
    def __call__(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        return self.model.forward_step(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)


def num_chunks_for(config: ModelConfig, pixel_frames: int) -> int:
    return config.latent_frames_for(pixel_frames) // config.frames_per_chunk


@torch.no_grad()
def prefill_cache(step: ChunkStep, cache: KVCache, latents: torch.Tensor, cross_k, cross_v):
    """Write given clean latent frames [B, C, Fp, H, W] into the cache (continuation, i2v)."""
    cfg = step.config
    fpc = cfg.frames_per_chunk
    if latents.ndim != 5 or latents.shape[2] % fpc:
        raise ValueError(f"prefill latents must be [B, C, F, H, W] with F a multiple of {fpc}; "
                         f"got {list(latents.shape)}")
    for c in range(latents.shape[2] // fpc):
        chunk = latents[:, :, c * fpc:(c + 1) * fpc].to(step.device, step.dtype)
        t0 = torch.zeros(chunk.shape[0], fpc, device=step.device, dtype=step.dtype)
        _, k, v = step(chunk, t0, cross_k, cross_v, cache.k, cache.v, cache.frame_index, cache.cache_len)
        cache.append(k, v)


@torch.no_grad()
def generate(step: ChunkStep, context: torch.Tensor, *, num_chunks: int, schedule: Schedule = Schedule(),
             seed: int = 0, prefill: torch.Tensor | None = None,
             cache: KVCache | None = None) -> Iterator[torch.Tensor]:
    """Yield clean latents [B, C, Fc, H, W] chunk by chunk.

    context: [B, text_len, text_dim] prompt embeddings (encoded once; cross k/v computed once).
    Each chunk: noise -> `steps` denoising steps (x0 prediction, re-noise to the next sigma)
    -> yield -> clean pass at timestep 0 writing the chunk's keys/values (not after the last).
    """
    cfg = step.config
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive integer; got {num_chunks!r}")
    want = (cfg.text_len, cfg.text_dim)
    if context.ndim != 3 or tuple(context.shape[1:]) != want:
        raise ValueError(f"context must be [B, {want[0]}, {want[1]}] for config {cfg.name!r}; "
                         f"got {list(context.shape)}")
    batch = context.shape[0]
    dev, dtype = step.device, step.dtype
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    cross_k, cross_v = step.cross_kv(context)
    if cache is None:
        cache = KVCache(cfg, batch, dtype, dev)
    if prefill is not None:
        prefill_cache(step, cache, prefill, cross_k, cross_v)
    fpc = cfg.frames_per_chunk
    for c in range(num_chunks):
        x = torch.randn(cfg.chunk_shape(batch), generator=gen, device=dev, dtype=torch.float32)
        sigmas = schedule.sigmas_for_chunk(c)
        for i, sigma in enumerate(sigmas[:-1]):
            t = torch.full((batch, fpc), 1000.0 * sigma, device=dev, dtype=dtype)
            flow, _, _ = step(x.to(dtype), t, cross_k, cross_v, cache.k, cache.v, cache.frame_index,
                              cache.cache_len)
            x0 = flow_to_x0(x, flow.float(), sigma)
            if sigmas[i + 1] > 0:
                eps = torch.randn(x.shape, generator=gen, device=dev, dtype=torch.float32)
                x = renoise(x0, eps, sigmas[i + 1])
        yield x0
        if c + 1 < num_chunks:
            t0 = torch.zeros(batch, fpc, device=dev, dtype=dtype)
            _, k, v = step(x0.to(dtype), t0, cross_k, cross_v, cache.k, cache.v, cache.frame_index,
                           cache.cache_len)
            cache.append(k, v)
