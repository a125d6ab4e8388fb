"""The CUDA-graph runner's plumbing, driven through a CPU stand-in with graph semantics, plus
the real CUDA path (skipped without a GPU: it has not run in this project's CI)."""
import pytest
import torch

from asd_deploy.generator import EagerStep, generate
from asd_deploy.graphs import CudaGraphAPI, GraphedStep, StandInGraphAPI
from asd_deploy.schedule import Schedule

from conftest import assert_close, rand_context


def _video(step, ctx, **kw):
    return torch.cat([c.clone() for c in generate(step, ctx, **kw)], dim=2)


@pytest.mark.parametrize("schedule", [Schedule(steps=1), Schedule(steps=2, ffe=True)])
def test_graphed_loop_equals_eager_through_rolling_window(tiny_model, tiny_cfg, schedule):
    eager, ctx = EagerStep(tiny_model), rand_context(tiny_cfg)
    api = StandInGraphAPI()
    graphed = GraphedStep(EagerStep(tiny_model), api)
    kw = dict(num_chunks=5, schedule=schedule, seed=11)
    assert_close(_video(graphed, ctx, **kw), _video(eager, ctx, **kw), 0, "graphed vs eager video")
    assert api.captures == 1                 # one graph served every chunk, step and clean pass
    calls = sum(schedule.steps_for_chunk(c) for c in range(5)) + 4
    assert api.replays == calls
    _video(graphed, ctx, **kw)               # a new stream has a new cache: one more capture
    assert api.captures == 2


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


def test_capture_failure_falls_back_with_warning(tiny_model, tiny_cfg):
    class FailingAPI(StandInGraphAPI):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    ctx = rand_context(tiny_cfg)
    g = GraphedStep(EagerStep(tiny_model), FailingAPI())
    with pytest.warns(UserWarning, match="graph capture failed .* running without a graph"):
        v = _video(g, ctx, num_chunks=2, seed=2)
    assert g.fallback
    assert_close(v, _video(EagerStep(tiny_model), ctx, num_chunks=2, seed=2), 0, "fallback video")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; a GPU is present")
def test_cuda_graph_api_says_what_is_missing():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA GPU"):
        CudaGraphAPI()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine; not run here)")
def test_cuda_graph_matches_eager_on_gpu(tiny_cfg):
    from asd_deploy.model import build_model
    model = build_model(tiny_cfg, device="cuda")
    ctx = rand_context(tiny_cfg).cuda()
    api = CudaGraphAPI()
    v = _video(GraphedStep(EagerStep(model), api), ctx, num_chunks=5, seed=3)
    assert api.captures == 1
    assert_close(v, _video(EagerStep(model), ctx, num_chunks=5, seed=3), 1e-4, "CUDA graph vs eager")
