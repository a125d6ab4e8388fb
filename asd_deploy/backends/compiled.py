"""torch.compile backend: the chunk step function compiled whole (fullgraph), not the pipeline.

Owns: `CompiledStep`. The step is `CausalWanDiT.forward_step` compiled with
`fullgraph=True, dynamic=False`: static shapes, positions read from int64 device tensors, so one
graph serves every chunk, every step count and the rolling window without recompiling. The first
call compiles (tens of seconds on a small CPU); callers that time it report that warm-up apart.
The per-prompt cross-attention K/V stay eager (once per prompt). Does not own export or engines.
"""
from __future__ import annotations

import threading

import torch

from ..generator import EagerStep


class CompiledStep(EagerStep):
    """`forward_step` under `torch.compile(fullgraph=True)`, behind the chunk-step signature."""
    name = "compile"

    def __init__(self, model, mode: str | None = None):
        super().__init__(model)
        self._fn = torch.compile(model.forward_step, fullgraph=True, dynamic=False, mode=mode)
        self._lock = threading.Lock()  # the first call compiles; concurrent first calls wait for it
        self._warm = False

    @torch.no_grad()
    def __call__(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        if not self._warm:
            with self._lock:
                out = self._fn(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)
                self._warm = True
                return out
        return self._fn(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)
