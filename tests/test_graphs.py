"""The CUDA-graph runner's plumbing, driven through a CPU stand-in with graph semantics, plus
the real CUDA path (skipped without a GPU: it has not run in this project's CI)."""
import contextlib
import pytest
import torch

from asd_deploy.generator import EagerStep, generate
from asd_deploy.backends.graphs import CudaGraphAPI, GraphCaptureError, GraphedStep, StandInGraphAPI
from asd_deploy.schedule import Schedule

from conftest import assert_close, rand_context


def _video(step, ctx, **kw):
    return torch.cat([c.clone() for c in generate(step, ctx, **kw)], dim=2)


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("schedule", [Schedule(steps=1), Schedule(steps=2, ffe=True)])
def test_graphed_loop_equals_eager_through_rolling_window(tiny_model, tiny_cfg, schedule, live):
    """Per-call graphs: one graph serves every chunk, step and clean pass (plain or live cache)."""
    eager, ctx = EagerStep(tiny_model), rand_context(tiny_cfg)
    api = StandInGraphAPI()
    graphed = GraphedStep(EagerStep(tiny_model, live_cache=live), api, whole_chunk=False)
    kw = dict(num_chunks=5, schedule=schedule, seed=11)
    assert_close(_video(graphed, ctx, **kw), _video(eager, ctx, **kw), 1e-5 if live else 0, "graphed vs eager")
    assert api.captures == 1                 # one graph served every chunk, step and clean pass
    calls = sum(schedule.steps_for_chunk(c) for c in range(5)) + 4
    assert api.replays == calls
    _video(graphed, ctx, **kw)               # a new stream has a new cache: one more capture
    assert api.captures == 2


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("schedule", [Schedule(steps=1), Schedule(steps=2, ffe=True), Schedule(steps=3)])
def test_whole_chunk_graphs_equal_eager_through_rolling_window(tiny_model, tiny_cfg, schedule, live):
    """One replay per chunk (its clean pass of the previous chunk, cache write and every step),
    8 chunks through the rolling window: the same video as eager (same noise, drawn outside the
    graph), and the warm-up's cache writes undone (else the window would be off by chunks)."""
    eager, ctx = EagerStep(tiny_model), rand_context(tiny_cfg)
    api = StandInGraphAPI()
    graphed = GraphedStep(EagerStep(tiny_model, live_cache=live), api)
    kw = dict(num_chunks=8, schedule=schedule, seed=5)
    assert_close(_video(graphed, ctx, **kw), _video(eager, ctx, **kw), 1e-5 if live else 0,
                 "whole-chunk graphs vs eager")
    # chunk 0 (no clean pass) and chunk >= 1 (clean pass + steps): two graphs, one replay per chunk
    assert api.captures == 2 and api.replays == 8


def test_outputs_are_static_buffers_overwritten_by_next_replay(tiny_model, tiny_cfg):
    from asd_deploy.cache import KVCache
    g = GraphedStep(EagerStep(tiny_model), StandInGraphAPI())
    ctx = rand_context(tiny_cfg)
    ck, cv = g.cross_kv(ctx)
    cache = KVCache(tiny_cfg)
    x1, x2 = torch.randn(tiny_cfg.chunk_shape()), torch.randn(tiny_cfg.chunk_shape())
    t = torch.full((1, 3), 500.0)
    out1 = g(x1, t, ck, cv, cache.k, cache.v, cache.frame_index, cache.cache_len)
    first = out1[0].clone()
    out2 = g(x2, t, ck, cv, cache.k, cache.v, cache.frame_index, cache.cache_len)
    assert out2[0] is out1[0]                        # the same static tensor ...
    assert not torch.equal(out1[0], first)           # ... so the first result is gone: consume before replay


def test_stand_in_catches_positions_baked_at_capture(tiny_model, tiny_cfg):
    """The stand-in is a real check: a step that reads positions on the host at capture time
    (what `.item()` would do) gives a wrong video through it."""
    inner = EagerStep(tiny_model)

    class BakesPositions:
        config, dtype, device, cross_kv = inner.config, inner.dtype, inner.device, inner.cross_kv
        baked = None

        def __call__(self, x, t, ck, cv, k, v, frame_index, cache_len):
            if self.baked is None:
                self.baked = (frame_index.clone(), cache_len.clone())
            return inner(x, t, ck, cv, k, v, *self.baked)

    ctx = rand_context(tiny_cfg)
    bad = _video(GraphedStep(BakesPositions(), StandInGraphAPI()), ctx, num_chunks=3, seed=1)
    good = _video(inner, ctx, num_chunks=3, seed=1)
    assert (bad[:, :, 3:] - good[:, :, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("whole_chunk", [False, True])
def test_capture_failure_is_an_error_not_a_fallback(tiny_model, tiny_cfg, whole_chunk):
    class FailingAPI(StandInGraphAPI):
        def capture(self, fn, device):
            raise RuntimeError("operation not permitted when stream is capturing")

    api = FailingAPI()
    g = GraphedStep(EagerStep(tiny_model), api, whole_chunk=whole_chunk)
    with pytest.raises(GraphCaptureError, match="capture of .* failed .*operation not permitted"):
        _video(g, rand_context(tiny_cfg), num_chunks=2, seed=2)
    assert api.captures == 0 and api.replays == 0


def test_warmup_of_a_chunk_graph_leaves_the_cache_as_it_was(tiny_model, tiny_cfg):
    """The warm-up runs the chunk body (clean pass + cache write) for real: positions and the
    overwritten slot are put back, so the first replay writes the cache exactly once."""
    from asd_deploy.cache import KVCache
    from asd_deploy.generator import draw_noise

    step = EagerStep(tiny_model)
    ctx = rand_context(tiny_cfg)
    ck, cv = step.cross_kv(ctx)
    cache = KVCache(tiny_cfg)
    for _ in range(tiny_cfg.cache_chunks):  # a full window: the next write evicts a chunk still attended
        cache.append(*step(torch.randn(tiny_cfg.chunk_shape()), torch.zeros(1, 3), ck, cv, cache.k, cache.v,
                           cache.frame_index, cache.cache_len)[1:])
    before = [t.clone() for t in (cache.k, cache.v, cache.frame_index, cache.cache_len, cache.chunks_written)]
    calls = []

    class CountingAPI(StandInGraphAPI):
        def warmup(self, fn, device):
            for _ in range(3):
                fn()
                calls.append("warm")
    g = GraphedStep(step, CountingAPI())
    sig = Schedule(steps=1).sigmas_for_chunk(1)
    noise = draw_noise(torch.Generator().manual_seed(0), tiny_cfg.chunk_shape(), sig, "cpu")
    g._capture_chunk(noise, sig, ck, cv, cache, torch.randn(tiny_cfg.chunk_shape()))
    assert calls == ["warm"] * 3
    for a, b in zip(before, (cache.k, cache.v, cache.frame_index, cache.cache_len, cache.chunks_written)):
        assert torch.equal(a, b)


def test_cuda_graph_api_refuses_a_step_off_the_gpu(tiny_model):
    """A CPU step under a CUDA graph records an empty graph and replays stale outputs: refused."""
    api = CudaGraphAPI.__new__(CudaGraphAPI)  # no GPU needed to check the refusal
    with pytest.raises(ValueError, match="step runs on cpu: its graph would be empty"):
        GraphedStep(EagerStep(tiny_model), api)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; a GPU is present")
def test_cuda_graph_api_says_what_is_missing():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA GPU"):
        CudaGraphAPI()




def test_cuda_graph_capture_lets_other_threads_work(monkeypatch):
    """The pipelined stream captures on the DiT's thread while the decoder's thread runs CUDA work:
    in the default ("global") capture mode that other thread's syncs abort the capture (seen on an
    H200: cudaErrorStreamCaptureUnsupported). The capture must be thread_local."""
    seen = {}

    class FakeGraph:
        def pool(self):
            return "pool"

        def replay(self):
            pass

    @contextlib.contextmanager
    def fake_graph(g, pool=None, capture_error_mode="global", **kw):
        seen["mode"] = capture_error_mode
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    api = CudaGraphAPI.__new__(CudaGraphAPI)
    api.captures, api.replays, api.pool = 0, 0, None
    outs, replay = api.capture(lambda: "out", torch.device("cuda", 0))
    assert (outs, seen["mode"], api.captures) == ("out", "thread_local", 1)
