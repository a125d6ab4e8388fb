"""torch.compile backend: the chunk step function compiled whole (fullgraph), not the pipeline.

Owns: `CompiledStep`. The step is `CausalWanDiT.forward_step` compiled with
`fullgraph=True, dynamic=False`: static shapes, positions read from int64 device tensors, so one
graph serves every chunk, every step count and the rolling window without recompiling. The first
call compiles (tens of seconds on a small CPU); callers that time it report that warm-up apart.
The per-prompt cross-attention K/V stay eager (once per prompt). The Triton kernels are
operators inside the graph on CUDA (`kernels.prepare`). It compiles `forward_step`, not
`forward_step_live`, by default (`live_cache=False`): Inductor functionalizes the per-layer
writes into the cache's work area into a clone of the whole buffer (seen in its generated code on
CPU, torch 2.13), which costs more than the concatenation it would remove. Does not own export
or engines.
"""
from __future__ import annotations

import threading

import torch

from .. import kernels
from ..generator import EagerStep


class CompiledStep(EagerStep):
    """`forward_step` under `torch.compile(fullgraph=True)`, behind the chunk-step signature."""
    name = "compile"

    def __init__(self, model, mode: str | None = None, live_cache: bool = False):
        super().__init__(model, live_cache)
        kernels.prepare(self.device)  # the Triton kernels' operators exist before Dynamo traces them
        # one compiled function per cache layout (compiled lazily, at its first call)
        self._fns = {live: torch.compile(model.forward_step_live if live else model.forward_step, fullgraph=True,
                                         dynamic=False, mode=mode) for live in (False, True)}
        self._lock = threading.Lock()  # the first call compiles; concurrent first calls wait for it
        self._warm = set()

    @torch.no_grad()
    def __call__(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        live = cache_k.shape[2] != self.config.cache_tokens
        fn = self._fns[live]
        if live not in self._warm:
            with self._lock:
                out = fn(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)
                self._warm.add(live)
                return out
        return fn(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)
