"""What the networks compute during training: sequences, teacher forcing, the Self-Forcing rollout.

Owns:
  - `TrainNet`: a `CausalWanDiT` under training (Self-Forcing's wrapper, hence the `model.` key
    prefix of the checkpoints) with explicit entry points: `forward` (whole sequence, optional
    mask and frame positions), `step` (one chunk against a cache), `cross_kv`, `features`
    (mean-pooled hidden states of one block: the discriminator's input). FSDP2 shards it as one
    root unit (`distributed.shard`), each entry point registered as a forward method.
  - teacher forcing: the [clean chunks, noisy chunks] sequence, its mask and RoPE positions;
  - `rollout`: the student generating a video chunk by chunk with its own KV cache;
  - `StepRandom` / `BatchNoise`: all randomness of a step, from (seed, step, stream).
Does not own: losses (`losses.py`), optimisation and checkpoints (`train.py`).

Randomness is rank-independent: every batch-shaped draw is made for the GLOBAL batch and each rank
keeps its own rows, and every scalar draw (the exit step, n) is made identically on all ranks. So
sample i gets the same noise whatever the number of processes, and nothing is broadcast.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from asd_deploy.cache import attention_mask, chunk_visible
from asd_deploy.generator import sample_chunks
from asd_deploy.model import CausalWanDiT
from asd_deploy.schedule import Schedule

# ---------------------------------------------------------------------------------------------
# randomness
# ---------------------------------------------------------------------------------------------


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (seed, step, stream name): independent streams, no state."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class BatchNoise:
    """One seeded CPU generator. `randn`/`rand` draw the global batch and keep rows
    [rank * b, (rank + 1) * b); scalar draws (`randint`) are the same on every rank."""

    def __init__(self, seed: int, rank: int = 0, world: int = 1, device="cpu"):
        self.gen = torch.Generator().manual_seed(seed)
        self.rank, self.world, self.device = rank, world, torch.device(device)

    def _rows(self, full: torch.Tensor, batch: int) -> torch.Tensor:
        return full[self.rank * batch:(self.rank + 1) * batch].to(self.device)

    def randn(self, batch: int, *shape) -> torch.Tensor:
        """[batch, *shape] standard normal: this rank's rows of a [world * batch, *shape] draw."""
        return self._rows(torch.randn(self.world * batch, *shape, generator=self.gen), batch)

    def rand(self, batch: int, *shape) -> torch.Tensor:
        return self._rows(torch.rand(self.world * batch, *shape, generator=self.gen), batch)

    def randint(self, low: int, high: int) -> int:
        """Uniform in [low, high], identical on all ranks."""
        return int(torch.randint(low, high + 1, (1,), generator=self.gen))

    def seed(self) -> int:
        return int(torch.randint(0, 2 ** 62, (1,), generator=self.gen))

    def child(self, seed: int | None = None) -> "BatchNoise":
        """An independent stream on the same ranks (seed drawn here unless given)."""
        return BatchNoise(self.seed() if seed is None else seed, self.rank, self.world, self.device)


class StepRandom:
    """All randomness of training step `step`: `stream(name)` is an independent `BatchNoise`."""

    def __init__(self, seed: int, step: int, rank: int = 0, world: int = 1, device="cpu"):
        self.seed, self.step, self.rank, self.world, self.device = seed, step, rank, world, device

    def stream(self, name: str) -> BatchNoise:
        return BatchNoise(derive_seed(self.seed, self.step, name), self.rank, self.world, self.device)


# ---------------------------------------------------------------------------------------------
# the network under training
# ---------------------------------------------------------------------------------------------


class TrainNet(nn.Module):
    """A CausalWanDiT with the entry points training needs. State-dict keys: `model.<Wan key>`."""

    def __init__(self, model: CausalWanDiT):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, x, t, context, mask=None, positions=None):
        """Flow for a whole sequence: `model.forward_train` (block-causal window mask by default).
        With `positions` (the frames' RoPE time indices, int64 [F]; teacher forcing places the
        noisy copy at the clean copy's positions) an explicit `mask` is required."""
        if positions is not None and mask is None:
            raise ValueError("forward with explicit positions needs an explicit mask")
        return self.model.forward_train(x, t, context, mask, positions)

    def features(self, x, t, context, layers: tuple[int, ...], tokens: bool = False, clean=None):
        """What the discriminator reads: the outputs of blocks `layers` for the tokens of x,
        concatenated, fp32 [B, tokens, dim * len(layers)] with `tokens`, else their mean over
        tokens [B, dim * len(layers)]. Layout as the scores see a generated video (`score`):
        block-causal over x, or with `clean` teacher forcing behind the clean copy."""
        cfg = self.config
        frames = x.shape[2]
        if clean is None:
            mask = attention_mask(cfg, frames, x.device) if frames > cfg.frames_per_chunk else None
            hs, _ = self.model.hidden_states(x, t, context, mask, collect=tuple(layers))
        else:
            seq, t_seq, positions = teacher_forcing_inputs(clean, x, t)
            mask = teacher_forcing_mask(cfg, frames // cfg.frames_per_chunk, x.device)
            hs, _ = self.model.hidden_states(seq, t_seq, context, mask, positions, collect=tuple(layers))
            hs = [h[:, frames * cfg.tokens_per_frame:] for h in hs]  # the noisy copy's tokens
        h = torch.cat(hs, dim=-1).float()
        return h if tokens else h.mean(dim=1)

    def score(self, x_t, t, context, clean=None):
        """Flow of a noisy generated video x_t [B, C, F, H, W] at timesteps t [B, F]: under the
        block-causal mask (`clean` None), or teacher-forced behind the clean video `clean` (each
        noisy chunk sees the clean chunks before it, as inference's cache holds them)."""
        if clean is None:
            return self(x_t, t, context)
        frames = x_t.shape[2]
        seq, t_seq, positions = teacher_forcing_inputs(clean, x_t, t)
        mask = teacher_forcing_mask(self.config, frames // self.config.frames_per_chunk, x_t.device)
        return self(seq, t_seq, context, mask, positions)[:, :, frames:]

    def step(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        """`model.forward_step`: one chunk against a static cache (see asd_deploy.model)."""
        return self.model.forward_step(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)

    def cross_kv(self, context):
        return self.model.cross_kv(context)


FORWARD_METHODS = ("step", "cross_kv", "features")  # entry points besides forward (FSDP2 hooks them)


# ---------------------------------------------------------------------------------------------
# teacher forcing
# ---------------------------------------------------------------------------------------------


def teacher_forcing_mask(config, num_chunks: int, device=None) -> torch.Tensor:
    """bool [2L, 2L] over the tokens of [clean chunks 0..n-1, noisy chunks 0..n-1] (L = n chunks).

    clean i sees clean j as inference's cache does (window semantics, itself included); noisy i
    sees the clean chunks before it in that window and itself, never another noisy chunk: what a
    chunk sees when it is denoised against a cache of clean keys."""
    n = num_chunks
    vis = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if chunk_visible(config, i, j):
                vis[i, j] = True                      # clean -> clean
                vis[n + i, j] = j < i                 # noisy -> earlier clean
        vis[n + i, n + i] = True                      # noisy -> itself
    rep = config.tokens_per_chunk
    return vis.repeat_interleave(rep, 0).repeat_interleave(rep, 1).to(device)


def teacher_forcing_inputs(x0, x_t, t_frames):
    """x0, x_t [B, C, F, H, W], t_frames [B, F] -> sequence [B, C, 2F, H, W], timesteps [B, 2F]
    (clean frames at t = 0, as the inference clean pass) and RoPE positions [2F] (both copies
    at the frames' own positions)."""
    frames = x0.shape[2]
    seq = torch.cat([x0, x_t], dim=2)
    t = torch.cat([torch.zeros_like(t_frames), t_frames], dim=1)
    positions = torch.arange(frames, device=x0.device).repeat(2)
    return seq, t, positions


# ---------------------------------------------------------------------------------------------
# the Self-Forcing rollout
# ---------------------------------------------------------------------------------------------


class _NetStep:
    """A TrainNet behind the chunk-step protocol of `asd_deploy.generator` (FSDP2 hooks `step`
    and `cross_kv`, so the sampler calls those, never the bare model)."""

    def __init__(self, net: TrainNet, device):
        self.net, self.config = net, net.config
        self.dtype, self.device = torch.float32, torch.device(device)

    def cross_kv(self, context):
        return self.net.cross_kv(context)

    def __call__(self, *args):
        return self.net.step(*args)


class RolloutNoise:
    """The rollout's noise: every chunk's initial noise drawn first ([B, n, C, Fc, H, W]), then the
    re-noising draws in loop order, so two rollouts from equal `BatchNoise` seeds start every
    chunk from the same noise whatever their step counts (ASD's x_n and x_{n+1})."""

    def __init__(self, noise: BatchNoise, batch: int, num_chunks: int, config):
        self.noise = noise
        self.init = noise.randn(batch, num_chunks, *config.chunk_shape()[1:])

    def initial(self, chunk: int, shape) -> torch.Tensor:
        return self.init[:, chunk]

    def renoise(self, chunk: int, shape) -> torch.Tensor:
        return self.noise.randn(shape[0], *shape[1:])


def rollout(net: TrainNet, context: torch.Tensor, num_chunks: int, steps: int, noise: BatchNoise,
            exit_steps: list[int] | None = None, grad: bool = False) -> torch.Tensor:
    """The student generates `num_chunks` chunks with its own KV cache -> x0 [B, C, n*Fc, H, W]:
    `asd_deploy.generator.sample_chunks` (the inference sampler) with the `steps`-step schedule,
    chunk c stopping at step `exit_steps[c]` (default: the last) and yielding that step's x0
    prediction (Self-Forcing). With `grad`, that one step carries gradients; every other step and
    the clean pass run without grad, as in Self-Forcing, so the cache never needs gradients."""
    exits = None if exit_steps is None else list(exit_steps)
    if exits is not None and (len(exits) != num_chunks or any(not 0 <= e < steps for e in exits)):
        raise ValueError(f"exit_steps must be {num_chunks} indices in [0, {steps}); got {exits}")
    chunks = sample_chunks(_NetStep(net, context.device), context, num_chunks=num_chunks,
                           schedule=Schedule(steps=steps), noise=RolloutNoise(noise, context.shape[0],
                                                                              num_chunks, net.config),
                           exit_steps=exits, grad=grad)
    return torch.cat(list(chunks), dim=2)
