"""The static key/value cache and the attention window it implies.

Owns: `KVCache` (preallocated keys/values of all layers plus the positions, kept as device
tensors so the loop never syncs with the host) and `attention_mask`, the token mask that
`forward_train` uses, which is the same window the cache realises chunk by chunk.

Window semantics: a chunk attends to itself, to the first `sink_frames` latent frames, and to
the most recent `max_cache_frames - sink_frames` frames before it. Before the cache is full that
is simply every earlier frame (block-causal). When it is full, the next chunk's keys overwrite
the oldest non-sink chunk (a ring over the non-sink slots); since RoPE is applied before caching,
at absolute frame positions, the physical slot order does not matter to attention.
"""
from __future__ import annotations

import torch

from .config import ModelConfig


def chunk_visible(config: ModelConfig, query_chunk: int, key_chunk: int) -> bool:
    """May chunk `query_chunk` attend to chunk `key_chunk`? (the window semantics above)"""
    recent = config.cache_chunks - config.sink_chunks
    return key_chunk == query_chunk or (key_chunk < query_chunk and (
        key_chunk < config.sink_chunks or query_chunk - key_chunk <= recent))


def attention_mask(config: ModelConfig, frames: int, device=None) -> torch.Tensor:
    """bool [L, L] over the tokens of `frames` latent frames (True = may attend)."""
    n = frames // config.frames_per_chunk
    chunks = torch.tensor([[chunk_visible(config, i, j) for j in range(n)] for i in range(n)],
                          dtype=torch.bool, device=device)
    rep = config.tokens_per_chunk
    return chunks.repeat_interleave(rep, 0).repeat_interleave(rep, 1)


def chunk_slot(config: ModelConfig, chunk: torch.Tensor) -> torch.Tensor:
    """Cache slot (in chunks) that chunk number `chunk` (device tensor) is written to."""
    cap, sink = config.cache_chunks, config.sink_chunks
    ring = sink + torch.remainder(chunk - sink, cap - sink)
    return torch.where(chunk < cap, chunk, ring)


class KVCache:
    """Preallocated keys/values [layers, B, cache_tokens, heads, head_dim] and positions.

    `frame_index` (absolute latent frame of the next chunk) and `cache_len` (valid tokens) are
    int64 [1] device tensors updated in place, so a captured graph can read them every replay.
    With `work_chunk=True` the buffers hold tokens_per_chunk more slots after the cache, where
    `model.forward_step_live` writes the chunk being denoised (never a cached chunk): what lets
    attention read the cache in place. Engines take the plain layout (their signature's).
    """

    def __init__(self, config: ModelConfig, batch: int = 1, dtype=torch.float32, device="cpu",
                 work_chunk: bool = False):
        self.config = config
        self.work_chunk = work_chunk
        shape = config.cache_shape(batch)
        if work_chunk:
            shape = shape[:2] + (config.cache_tokens + config.tokens_per_chunk,) + shape[3:]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.chunks_written = torch.zeros(1, dtype=torch.long, device=device)
        self.frame_index = torch.zeros(1, dtype=torch.long, device=device)
        self.cache_len = torch.zeros(1, dtype=torch.long, device=device)
        self._offsets = torch.arange(config.tokens_per_chunk, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self):
        for t in (self.k, self.v, self.chunks_written, self.frame_index, self.cache_len):
            t.zero_()

    def _next_slots(self) -> torch.Tensor:
        """Token indices [tokens_per_chunk] (device) the next `append` writes."""
        return chunk_slot(self.config, self.chunks_written) * self.config.tokens_per_chunk + self._offsets

    def snapshot(self):
        """A function that puts back what the next `append` changes (the positions and the slot
        it overwrites), so running the loop body for real (a graph's warm-up) can be undone.
        Device ops only: no host sync."""
        idx = self._next_slots()
        pos = [t.clone() for t in (self.chunks_written, self.frame_index, self.cache_len)]
        k, v = self.k.index_select(2, idx), self.v.index_select(2, idx)

        def restore():
            for t, saved in zip((self.chunks_written, self.frame_index, self.cache_len), pos):
                t.copy_(saved)
            self.k.index_copy_(2, idx, k)
            self.v.index_copy_(2, idx, v)
        return restore

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor):
        """Write one chunk's keys/values [layers, B, tokens_per_chunk, H, D] and advance."""
        cfg = self.config
        want = self.k.shape[:2] + (cfg.tokens_per_chunk,) + self.k.shape[3:]  # (work_chunk: k_new may view it)
        if k_new.shape != want or v_new.shape != want:
            raise ValueError(f"chunk keys/values must be {list(want)}; got {list(k_new.shape)} and "
                             f"{list(v_new.shape)}")
        idx = self._next_slots()
        # views of this cache's work area (forward_step_live) are copied once (one chunk): a
        # write may not read its own buffer
        if k_new.untyped_storage().data_ptr() == self.k.untyped_storage().data_ptr():
            k_new = k_new.clone()
        if v_new.untyped_storage().data_ptr() == self.v.untyped_storage().data_ptr():
            v_new = v_new.clone()
        self.k.index_copy_(2, idx, k_new.to(self.k.dtype))
        self.v.index_copy_(2, idx, v_new.to(self.v.dtype))
        self.chunks_written += 1
        self.frame_index.copy_(self.chunks_written * cfg.frames_per_chunk)
        self.cache_len.copy_(torch.clamp(self.chunks_written, max=cfg.cache_chunks) * cfg.tokens_per_chunk)
