"""CUDA-graph capture of the chunk step and of whole chunks: capture once, replay.

Owns: `GraphedStep`, which wraps any chunk step (eager, compiled, TensorRT) behind the same
signature, and the capture API it drives (`CudaGraphAPI` for a GPU, `StandInGraphAPI` for CPU
tests). Two granularities:
  - per call (`GraphedStep(...)(x, t, ...)`): one graph of one step call, static x/t buffers;
  - per chunk (`run_chunk`, what `generate` calls when a step offers it): one graph holds the
    previous chunk's clean pass and its cache write plus every denoising step of the chunk, so
    a chunk is one replay. Noise is drawn outside the graph from the loop's seeded generator,
    in the loop's order, into static buffers (`generator.draw_noise`): the video is the same as
    without graphs, and no RNG state lives in the graph. One graph per (clean pass or not,
    sigma list): with FFE, one for chunk 0 and one for every later chunk.
Does not own the step itself, the loop body (`generator.denoise_chunk`) or the noise.

Why one graph serves every chunk: every shape is static, and the positions (`frame_index`,
`cache_len`, `chunks_written`) are int64 device tensors owned by `KVCache` and updated in
place, so the same kernels read new positions each replay. The cache buffers and the cross
keys/values are read by address, so graphs are tied to those tensors: a new cache (a new
stream) triggers new captures, and a `GraphedStep` serves one stream at a time (it holds a
lock; give each concurrent stream its own `GraphedStep`).

Warm-up runs the body for real, which for a whole chunk writes the cache; the cache's
`snapshot` puts back what it changed after each warm-up run (and after the stand-in's capture,
which also runs it). Capture failure is an error, never a silent eager fallback.

Replay semantics (CUDA's): per-call outputs live in static buffers that the next replay
overwrites (consume them first, as the loop does); `run_chunk` returns a fresh tensor.

NOT RUN HERE: the CUDA path follows the PyTorch CUDA-graph documentation and has not run on a GPU
in this project (`tests/test_gpu.py` and `python -m benchmarks.gpu --check` check it where one
is). The CPU stand-in checks the buffer plumbing, the positions and the warm-up undo by making
the same calls.
"""
from __future__ import annotations

import threading

import torch

from ..generator import denoise_chunk


class StandInGraphAPI:
    """CPU stand-in with CUDA-graph semantics: `capture` runs the function once and keeps its
    output tensors; `replay` re-runs the function and writes into those same output tensors.
    Anything a runner baked at capture time (a Python int read from a position, a tensor that is
    not a static buffer) goes stale exactly as it would in a real graph."""
    name = "cpu-stand-in"

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def check_device(self, device: torch.device):
        pass

    def warmup(self, fn, device):
        fn()

    def capture(self, fn, device):
        outs = fn()
        self.captures += 1

        def replay():
            self.replays += 1
            for o, n in zip(outs, fn()):
                if o is not n:
                    o.copy_(n)
        return outs, replay


class CudaGraphAPI:
    """torch.cuda.CUDAGraph captured on the step's device after warm-up iterations on a side
    stream (PyTorch's documented recipe); graphs share one memory pool."""
    name = "cuda-graph"

    def __init__(self, warmup_iters: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA GPU; none is visible (torch.cuda.is_available() is False). "
                               "Use the plain backend, or run on a GPU machine with `pip install .[gpu]`.")
        self.warmup_iters = warmup_iters
        self.captures = 0
        self.replays = 0
        self.pool = None

    def check_device(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph captures CUDA work, but the step runs on {device}: its graph would be "
                             f"empty and every replay would return the outputs of the capture run. Put the step on "
                             f"the GPU (--device cuda) or drop --cuda-graph.")

    def warmup(self, fn, device):
        with torch.cuda.device(device):
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(self.warmup_iters):
                    fn()
            torch.cuda.current_stream().wait_stream(s)

    def capture(self, fn, device):
        with torch.cuda.device(device):
            g = torch.cuda.CUDAGraph()
            # thread_local: a capture on the pipeline's DiT thread must not fail because the
            # decoder's thread syncs or allocates meanwhile (the default "global" mode makes every
            # thread's unsafe call an error: seen on an H200, cudaErrorStreamCaptureUnsupported);
            # unsafe calls on the capturing thread itself still fail the capture
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                outs = fn()
        # shared pool: safe because no tensor allocated inside one graph is read outside it or
        # by another graph, except static outputs kept alive here (the pool never reuses those)
        self.pool = g.pool()
        self.captures += 1  # counted once the capture succeeded

        def replay():
            with torch.cuda.device(device):
                g.replay()
            self.replays += 1
        return outs, replay


class GraphCaptureError(RuntimeError):
    """Capture failed: the step does something a graph cannot hold (a host sync, a host->device
    copy, an allocation outside the graph's pool, an unsupported op)."""


class GraphedStep:
    """A chunk step captured once and replayed. Same signature as every backend, plus
    `run_chunk` (whole-chunk graphs, used by `generate`) unless `whole_chunk=False`."""

    def __init__(self, step, api=None, whole_chunk: bool = True):
        self.inner = step
        self.config, self.dtype, self.device = step.config, step.dtype, torch.device(step.device)
        self.live_cache = getattr(step, "live_cache", False)
        self.name = f"{getattr(step, 'name', 'step')}+graph"
        self.api = api if api is not None else CudaGraphAPI()
        self.api.check_device(self.device)
        self.whole_chunk = whole_chunk
        self._lock = threading.Lock()
        self._key = None           # per-call graph: the tensors it reads by address
        self._static = None
        self._outs = None
        self._replay = None
        self._chunk_key = None     # chunk graphs: the tensors they read by address
        self._chunks = {}          # (clean pass?, sigmas) -> (static noise, static prev, out, replay)

    def cross_kv(self, context):
        return self.inner.cross_kv(context)

    def _captured(self, what: str, run, warm=None, undo=None):
        """(outputs, replay) of `run` captured after warm-up; loud on failure."""
        try:
            self.api.warmup(warm or run, self.device)
            outs, replay = self.api.capture(run, self.device)
        except Exception as e:
            raise GraphCaptureError(
                f"CUDA-graph capture of {what} of {getattr(self.inner, 'name', 'the step')} failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). A graph cannot hold host syncs "
                f"(.item(), printing a tensor), host->device copies or data-dependent shapes; run without "
                f"--cuda-graph, or fix the step") from e
        finally:
            if undo is not None:
                undo()
        return outs, replay

    # ---- per call ------------------------------------------------------------------------------
    def __call__(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        with self._lock:
            key = tuple(a.data_ptr() for a in (cross_k, cross_v, cache_k, cache_v, frame_index, cache_len))
            if key != self._key:
                # x and t are copied into static buffers each call; the rest are read in place
                sx, st = x.clone(), t.clone()

                def run():
                    return self.inner(sx, st, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)
                self._key = None
                self._outs, self._replay = self._captured("one step call", run)
                self._static, self._key = (sx, st), key
            sx, st = self._static
            if x.shape != sx.shape or t.shape != st.shape:
                raise ValueError(f"captured for x {list(sx.shape)}, t {list(st.shape)}; got {list(x.shape)}, "
                                 f"{list(t.shape)}")
            sx.copy_(x)
            st.copy_(t)
            self._replay()
            return self._outs

    # ---- per chunk -----------------------------------------------------------------------------
    def run_chunk(self, noise, sigmas, cross_k, cross_v, cache, prev_x0=None):
        """`generator.denoise_chunk` as one graph replay -> x0 (a fresh tensor)."""
        if not self.whole_chunk:
            return denoise_chunk(self, noise, sigmas, cross_k, cross_v, cache, prev_x0)
        with self._lock:
            tensors = (cross_k, cross_v, cache.k, cache.v, cache.frame_index, cache.cache_len, cache.chunks_written)
            where = tuple(a.data_ptr() for a in tensors)
            if where != self._chunk_key:
                self._chunks.clear()  # a new stream: the old graphs read the old cache
                self._chunk_key = where
            key = (prev_x0 is not None, tuple(sigmas), len(noise), tuple(noise[0].shape))
            if key not in self._chunks:
                self._chunks[key] = self._capture_chunk(noise, sigmas, cross_k, cross_v, cache, prev_x0)
            static_noise, static_prev, out, replay = self._chunks[key]
            for buf, n in zip(static_noise, noise):
                buf.copy_(n)
            if prev_x0 is not None:
                static_prev.copy_(prev_x0)
            replay()
            return out.clone()

    def _capture_chunk(self, noise, sigmas, cross_k, cross_v, cache, prev_x0):
        static_noise = [n.clone() for n in noise]
        static_prev = None if prev_x0 is None else prev_x0.clone()
        out = torch.empty_like(noise[0])

        def run():
            out.copy_(denoise_chunk(self.inner, static_noise, sigmas, cross_k, cross_v, cache, static_prev))
            return (out,)
        undo = cache.snapshot()  # what the body's cache.append changes

        def warm():
            run()
            undo()
        what = f"a chunk ({len(sigmas) - 1} steps{' + the clean pass' if prev_x0 is not None else ''})"
        _, replay = self._captured(what, run, warm=warm, undo=undo)
        return static_noise, static_prev, out, replay
