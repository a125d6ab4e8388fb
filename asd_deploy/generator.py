"""The autoregressive loop: chunk after chunk, a few denoising steps each, then the clean pass.

Owns: the chunk-step protocol every backend implements, `EagerStep` (the eager model behind
that protocol) and `generate`, which yields each chunk's clean latents as soon as it is done.
Does not own: how a step is computed (backends), decoding (vae.py), prompts (text.py).

The loop never asks which backend it has, never reads a tensor back to the host, and draws all
noise from one seeded `torch.Generator` in a fixed order, so a seed fixes the video.
"""
from __future__ import annotations

import numbers
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
    """The eager PyTorch model as a chunk step.

    With a `KVCache(work_chunk=True)` (its buffers have one chunk of slots after the cache) it
    runs `forward_step_live`, attending to the cache in place; with a plain cache,
    `forward_step`. `live_cache` says which cache the loop makes for it: by default the live one
    on CUDA, where the per-layer copy of the cache is the step's largest memory traffic."""
    name = "eager"

    def __init__(self, model, live_cache: bool | None = None):
        self.model = model.eval()
        self.config = model.config
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.live_cache = self.device.type == "cuda" if live_cache is None else bool(live_cache)

    @torch.no_grad()
    def cross_kv(self, context):
        return self.model.cross_kv(context.to(self.device, self.dtype))

    @torch.no_grad()
    def __call__(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        fn = self.model.forward_step if cache_k.shape[2] == self.config.cache_tokens else self.model.forward_step_live
        return fn(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)


def num_chunks_for(config: ModelConfig, pixel_frames: int) -> int:
    return config.latent_frames_for(pixel_frames) // config.frames_per_chunk


def draw_noise(gen: torch.Generator, shape, sigmas: list[float], device) -> list[torch.Tensor]:
    """A chunk's inference noise, fp32: its initial noise, then one draw per re-noising (each
    step whose next sigma is > 0), one tensor at a time in `SeededNoise`'s order, so drawing them
    before the chunk runs gives the values the loop draws between steps."""
    n = 1 + sum(1 for s in sigmas[1:] if s > 0)
    return [torch.randn(shape, generator=gen, device=device, dtype=torch.float32) for _ in range(n)]


def denoise_chunk(step: ChunkStep, noise: list[torch.Tensor], sigmas: list[float], cross_k, cross_v,
                  cache: KVCache, prev_x0: torch.Tensor | None = None) -> torch.Tensor:
    """One inference chunk as one unit of device work: the previous chunk's clean pass (t = 0,
    its keys/values into the cache) when `prev_x0` is given, then this chunk's denoising steps
    from `noise` (`draw_noise`) -> clean latents x0 [B, C, Fc, H, W] fp32. `sample_chunks`'s
    stochastic path without guidance, in the same order; sigmas are Python numbers and nothing
    reads the host, so one CUDA graph can hold it all (`backends/graphs.py`)."""
    dev, dtype = step.device, step.dtype
    batch, fpc = noise[0].shape[0], step.config.frames_per_chunk
    if prev_x0 is not None:
        t0 = torch.zeros(batch, fpc, device=dev, dtype=dtype)
        _, k, v = step(prev_x0.to(dtype), t0, cross_k, cross_v, cache.k, cache.v, cache.frame_index,
                       cache.cache_len)
        cache.append(k, v)
    x, eps = noise[0], iter(noise[1:])
    for i, sigma in enumerate(sigmas[:-1]):
        t = torch.full((batch, fpc), step.config.num_train_timesteps * sigma, device=dev, dtype=dtype)
        flow, _, _ = step(x.to(dtype), t, cross_k, cross_v, cache.k, cache.v, cache.frame_index, cache.cache_len)
        x0 = flow_to_x0(x, flow.float(), sigma)
        if sigmas[i + 1] > 0:
            x = renoise(x0, next(eps), sigmas[i + 1])
    return x0


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


SEED_LIMIT = 2 ** 63  # the C++ runtime takes int64 seeds; torch.Generator wraps anything larger


def check_seed(seed) -> int:
    """A seed is an int in [0, 2**63): no silent truncation of 1.5, wrap-around of -1 or overflow."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**63); got {seed!r}")
    return int(seed)


class SeededNoise:
    """Inference noise: one seeded `torch.Generator`, drawn in loop order (chunk c's initial noise,
    then its re-noising draws, then chunk c + 1's). The C++ runtime draws in the same order."""

    def __init__(self, seed: int, device):
        self.gen = torch.Generator(device=device).manual_seed(check_seed(seed))
        self.device = device

    def initial(self, chunk: int, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)

    def renoise(self, chunk: int, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)


class ChunkNoise(Protocol):
    """Where the loop's noise comes from: the initial noise of chunk c, then each re-noising draw."""

    def initial(self, chunk: int, shape) -> torch.Tensor: ...

    def renoise(self, chunk: int, shape) -> torch.Tensor: ...


def _check_context(cfg: ModelConfig, context: torch.Tensor, num_chunks: int) -> None:
    if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive integer; got {num_chunks!r}")
    want = (cfg.text_len, cfg.text_dim)
    if context.ndim != 3 or tuple(context.shape[1:]) != want:
        raise ValueError(f"context must be [B, {want[0]}, {want[1]}] for config {cfg.name!r}; "
                         f"got {list(context.shape)}")


def sample_chunks(step: ChunkStep, context: torch.Tensor, *, num_chunks: int, schedule, noise: ChunkNoise,
                  guidance: float | None = None, exit_steps: list[int] | None = None, grad: bool = False,
                  prefill: torch.Tensor | None = None, cache: KVCache | None = None) -> Iterator[torch.Tensor]:
    """THE sampler: every Python path that denoises chunk after chunk calls it (inference
    `generate`, the training rollout with gradients, the teacher's guided multi-step sampler).
    Yields clean latents [B, C, Fc, H, W] chunk by chunk.

    schedule: `sigmas_for_chunk(c)` (the chunk's sigmas, then 0) and `stochastic`: True re-noises
        the x0 prediction with fresh noise to the next sigma (Self-Forcing / ASD students), False
        takes the Euler step of the flow ODE (the teacher).
    noise: `initial(c, shape)` and `renoise(c, shape)` draws (`SeededNoise` for inference; the
        training rollout pre-draws every chunk's initial noise so two rollouts of different step
        counts start each chunk from the same noise).
    guidance: classifier-free guidance `v_null + g (v_prompt - v_null)`; the step runs on the
        batch [prompt; null context (zeros)] with one cache holding both branches' keys.
    exit_steps: chunk c stops after step `exit_steps[c]` (Self-Forcing's random exit) and yields
        that step's x0 prediction; default: the last step.
    grad: the exit step of every chunk carries gradients (its input is detached, as everything
        before it runs without grad); the clean pass never does, so a plain cache serves.
    Each chunk ends with the clean pass at timestep 0 writing its keys/values (not after the last).
    """
    cfg = step.config
    _check_context(cfg, context, num_chunks)
    batch = context.shape[0]
    dev, dtype = step.device, step.dtype
    fpc = cfg.frames_per_chunk
    if guidance is not None:
        context = torch.cat([context, torch.zeros_like(context)])
    width = context.shape[0]  # batch, or 2 * batch with guidance
    with torch.set_grad_enabled(grad):
        cross_k, cross_v = step.cross_kv(context)
    if cache is None:  # with the work chunk where a live step attends in place
        cache = KVCache(cfg, width, dtype, dev, work_chunk=getattr(step, "live_cache", False))
    if prefill is not None:
        if prefill.ndim != 5 or prefill.shape[0] != batch:
            raise ValueError(f"prefill latents must be [B, C, F, H, W] with B = the context's batch {batch}; "
                             f"got {list(prefill.shape)}")
        if guidance is not None:  # both branches' caches hold the given frames, as after a clean pass
            prefill = torch.cat([prefill, prefill])
        prefill_cache(step, cache, prefill, cross_k, cross_v)
    shape = cfg.chunk_shape(batch)

    def flow_of(x, sigma):
        xin = x.to(dtype)
        if guidance is not None:
            xin = torch.cat([xin, xin])
        t = torch.full((width, fpc), cfg.num_train_timesteps * sigma, device=dev, dtype=dtype)
        flow, _, _ = step(xin, t, cross_k, cross_v, cache.k, cache.v, cache.frame_index, cache.cache_len)
        flow = flow.float()
        if guidance is not None:
            cond, null = flow.chunk(2)
            flow = null + guidance * (cond - null)
        return flow

    for c in range(num_chunks):
        x = noise.initial(c, shape)
        sigmas = schedule.sigmas_for_chunk(c)
        last = len(sigmas) - 2 if exit_steps is None else exit_steps[c]
        if not 0 <= last <= len(sigmas) - 2:
            raise ValueError(f"exit step {last} of chunk {c} is not in [0, {len(sigmas) - 2}]")
        for i in range(last + 1):
            sigma, nxt = sigmas[i], sigmas[i + 1]
            with torch.set_grad_enabled(grad and i == last):
                flow = flow_of(x, sigma)
                x0 = flow_to_x0(x, flow, sigma)
            if i < last:
                if schedule.stochastic:
                    x = renoise(x0, noise.renoise(c, shape), nxt) if nxt > 0 else x0
                else:
                    x = x + (nxt - sigma) * flow
        yield x0
        if c + 1 < num_chunks:
            with torch.no_grad():
                x_clean = x0.detach().to(dtype)
                if guidance is not None:
                    x_clean = torch.cat([x_clean, x_clean])
                t0 = torch.zeros(width, fpc, device=dev, dtype=dtype)
                _, k, v = step(x_clean, t0, cross_k, cross_v, cache.k, cache.v, cache.frame_index,
                               cache.cache_len)
                cache.append(k, v)


@torch.no_grad()
def generate(step: ChunkStep, context: torch.Tensor, *, num_chunks: int, schedule: Schedule = Schedule(),
             seed: int = 0, prefill: torch.Tensor | None = None,
             cache: KVCache | None = None) -> Iterator[torch.Tensor]:
    """Inference: yield clean latents [B, C, Fc, H, W] chunk by chunk (`sample_chunks` with the
    student's schedule and one seeded generator, no guidance).

    context: [B, text_len, text_dim] prompt embeddings (encoded once; cross k/v computed once).
    Each chunk: noise -> `steps` denoising steps (x0 prediction, re-noise to the next sigma)
    -> yield -> clean pass at timestep 0 writing the chunk's keys/values (not after the last).
    A step that offers `run_chunk` (whole-chunk CUDA graphs, `backends/graphs.py`) runs each
    chunk as one call of it, on the same noise drawn beforehand (`draw_noise`): the same video.
    """
    _check_context(step.config, context, num_chunks)
    run_chunk = getattr(step, "run_chunk", None)
    if run_chunk is None or not getattr(schedule, "stochastic", True):
        yield from sample_chunks(step, context, num_chunks=num_chunks, schedule=schedule,
                                 noise=SeededNoise(seed, step.device), prefill=prefill, cache=cache)
        return
    cfg, batch = step.config, context.shape[0]
    gen = SeededNoise(seed, step.device).gen
    cross_k, cross_v = step.cross_kv(context)
    if cache is None:
        cache = KVCache(cfg, batch, step.dtype, step.device, work_chunk=getattr(step, "live_cache", False))
    if prefill is not None:
        prefill_cache(step, cache, prefill, cross_k, cross_v)
    prev = None
    for c in range(num_chunks):
        sigmas = schedule.sigmas_for_chunk(c)
        prev = run_chunk(draw_noise(gen, cfg.chunk_shape(batch), sigmas, step.device), sigmas, cross_k, cross_v,
                         cache, prev)
        yield prev
