"""CUDA-graph capture of the chunk step: capture once, replay for every chunk and step.

Owns: `GraphedStep`, which wraps any chunk step (eager, compiled, TensorRT) behind the same
signature, with static input/output buffers; and the capture API it drives (`CudaGraphAPI` for a
GPU, `StandInGraphAPI` for CPU tests). Does not own the step itself or the loop.

Why it works for the whole loop: every shape is static, and the chunk's positions
(`frame_index`, `cache_len`) are int64 device tensors owned by `KVCache` and updated in place,
so one graph serves every chunk, every denoising step and the clean pass. The cache buffers and
the per-prompt cross keys/values are read by address, so a graph is tied to those tensors; a
new cache (a new stream) triggers one new capture.

Replay semantics (CUDA's): outputs live in static buffers that the next replay overwrites, so a
caller must consume (or clone) them first. The loop in `generator.py` does: it turns the flow
into x0 before the next call.

NOT RUN HERE: the CUDA path was written from the PyTorch CUDA-graph documentation and has not
been executed on a GPU in this project's CI (which has none). The CPU stand-in checks the
buffer plumbing and position bookkeeping by making the same calls.
"""
from __future__ import annotations

import warnings

import torch


class StandInGraphAPI:
    """CPU stand-in with CUDA-graph semantics: `capture` runs the function once and keeps its
    output tensors; `replay` re-runs the function and writes into those same output tensors.
    Anything a runner baked at capture time (a Python int read from a position, a tensor that is
    not a static buffer) goes stale exactly as it would in a real graph."""
    name = "cpu-stand-in"

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def warmup(self, fn):
        fn()

    def capture(self, fn):
        self.captures += 1
        outs = fn()

        def replay():
            self.replays += 1
            for o, n in zip(outs, fn()):
                o.copy_(n)
        return outs, replay


class CudaGraphAPI:
    """torch.cuda.CUDAGraph on a side stream, after warm-up iterations (PyTorch's documented recipe)."""
    name = "cuda-graph"

    def __init__(self, warmup_iters: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA GPU; none is visible (torch.cuda.is_available() is False). "
                               "Use the plain backend, or run on a GPU machine with `pip install .[gpu]`.")
        self.warmup_iters = warmup_iters
        self.captures = 0
        self.pool = None

    def warmup(self, fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(self.warmup_iters):
                fn()
        torch.cuda.current_stream().wait_stream(s)

    def capture(self, fn):
        self.captures += 1
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            outs = fn()
        self.pool = g.pool()
        return outs, g.replay


class GraphedStep:
    """A chunk step captured once and replayed. Same signature as every backend."""

    def __init__(self, step, api=None):
        self.inner = step
        self.config, self.dtype, self.device = step.config, step.dtype, step.device
        self.name = f"{getattr(step, 'name', 'step')}+graph"
        self.api = api if api is not None else CudaGraphAPI()
        self._key = None
        self._static = None
        self._outs = None
        self._replay = None
        self.fallback = False

    def cross_kv(self, context):
        return self.inner.cross_kv(context)

    def _capture(self, key, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        # x and t are copied into static buffers each call; the rest are used in place (by address).
        sx, st = x.clone(), t.clone()

        def run():
            return self.inner(sx, st, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)
        self.api.warmup(run)
        self._outs, self._replay = self.api.capture(run)
        self._static, self._key = (sx, st), key

    def __call__(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        if self.fallback:
            return self.inner(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)
        key = tuple(a.data_ptr() for a in (cross_k, cross_v, cache_k, cache_v, frame_index, cache_len))
        if key != self._key:
            try:
                self._capture(key, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)
            except Exception as e:  # capture can fail on unsupported ops / host syncs: run uncaptured
                warnings.warn(f"graph capture failed ({type(e).__name__}: {e}); running without a graph")
                self.fallback = True
                return self.inner(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)
        sx, st = self._static
        if x.shape != sx.shape or t.shape != st.shape:
            raise ValueError(f"captured for x {list(sx.shape)}, t {list(st.shape)}; got {list(x.shape)}, "
                             f"{list(t.shape)}")
        sx.copy_(x)
        st.copy_(t)
        self._replay()
        return self._outs
