import pytest
import torch

from asd_deploy.cache import KVCache
from asd_deploy.generator import EagerStep, generate, prefill_cache
from asd_deploy.schedule import Schedule

from conftest import assert_close, rand_context


def _video(step, ctx, **kw):
    return torch.cat(list(generate(step, ctx, **kw)), dim=2)


def test_same_seed_same_video_different_seed_differs(tiny_model, tiny_cfg):
    step, ctx = EagerStep(tiny_model), rand_context(tiny_cfg)
    a = _video(step, ctx, num_chunks=3, seed=7)
    assert a.shape == (1, 16, 9, 4, 6)
    assert torch.equal(a, _video(step, ctx, num_chunks=3, seed=7))
    assert (a - _video(step, ctx, num_chunks=3, seed=8)).abs().mean() > 0.1


def test_streams_lazily_and_counts_steps(tiny_model, tiny_cfg):
    """A chunk is yielded before the next is computed; FFE chunk 0 uses 4 steps, then 1 each,
    plus a clean pass after every chunk but the last."""
    calls = []
    inner = EagerStep(tiny_model)

    class Counting:
        config, dtype, device, cross_kv = inner.config, inner.dtype, inner.device, inner.cross_kv

        def __call__(self, x, t, *rest):
            calls.append(float(t[0, 0]))
            return inner(x, t, *rest)

    it = generate(Counting(), rand_context(tiny_cfg), num_chunks=3, schedule=Schedule(steps=1, ffe=True))
    next(it)
    assert len(calls) == 4
    list(it)
    assert calls == pytest.approx([1000, 937.5, 833.333, 625, 0, 1000, 0, 1000], abs=1e-3)


def test_loop_never_syncs_with_host(tiny_model, tiny_cfg, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("host sync inside the loop")
    step, ctx = EagerStep(tiny_model), rand_context(tiny_cfg)
    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    _video(step, ctx, num_chunks=5, schedule=Schedule(steps=2), seed=1)  # crosses the rolling window


def test_prefill_writes_the_clean_pass_keys(tiny_model, tiny_cfg):
    step, ctx = EagerStep(tiny_model), rand_context(tiny_cfg)
    cache = KVCache(tiny_cfg)
    chunks = list(generate(step, ctx, num_chunks=2, seed=3, cache=cache))
    pre = KVCache(tiny_cfg)
    ck, cv = step.cross_kv(ctx)
    prefill_cache(step, pre, chunks[0], ck, cv)
    tpc = tiny_cfg.tokens_per_chunk
    assert_close(pre.k[:, :, :tpc], cache.k[:, :, :tpc], 0, "prefilled keys")
    assert pre.frame_index.tolist() == [3] and pre.cache_len.tolist() == [tpc]
    # continuing from a prefilled cache: the same noise gives a different chunk than from an
    # empty cache (the prefilled frames are attended), and the chunk sits at frame 3
    cont_cache = KVCache(tiny_cfg)
    cont = list(generate(step, ctx, num_chunks=1, seed=3, prefill=chunks[0], cache=cont_cache))
    fresh = list(generate(step, ctx, num_chunks=1, seed=3))
    assert (cont[0] - fresh[0]).abs().mean() > 1e-3
    assert cont_cache.frame_index.tolist() == [3]


def test_guided_sampler_continues_a_prefill_as_its_own_chunk(tiny_model, tiny_cfg):
    """The teacher's guided sampler (both branches in one cache) given chunk 0 as `prefill`
    continues exactly as when it generated chunk 0 itself: the prefill reaches both branches."""
    from asd_deploy.generator import sample_chunks
    from asd_deploy.schedule import EulerSchedule

    step, ctx = EagerStep(tiny_model), rand_context(tiny_cfg)
    draws = [torch.randn(tiny_cfg.chunk_shape(1), generator=torch.Generator().manual_seed(c)) for c in range(2)]

    class Fixed:  # chunk c's initial noise, offset by the prefilled chunks
        def __init__(self, offset):
            self.offset = offset

        def initial(self, c, shape):
            return draws[c + self.offset].clone()

    run = dict(schedule=EulerSchedule(4, 5.0), guidance=3.0)
    own = list(sample_chunks(step, ctx, num_chunks=2, noise=Fixed(0), **run))
    cont = list(sample_chunks(step, ctx, num_chunks=1, noise=Fixed(1), prefill=own[0], **run))
    assert_close(cont[0], own[1], 1e-5, "chunk 1 after a prefilled chunk 0 vs after its own")
    with pytest.raises(ValueError, match="B = the context's batch 1"):
        next(sample_chunks(step, ctx, num_chunks=1, noise=Fixed(1), prefill=torch.cat([own[0]] * 2), **run))


def test_bad_inputs(tiny_model, tiny_cfg):
    step = EagerStep(tiny_model)
    with pytest.raises(ValueError, match=r"context must be \[B, 32, 384\]"):
        next(generate(step, torch.zeros(1, 5, 384), num_chunks=1))
    with pytest.raises(ValueError, match="num_chunks must be a positive integer"):
        next(generate(step, rand_context(tiny_cfg), num_chunks=0))
    with pytest.raises(ValueError, match="multiple of 3"):
        next(generate(step, rand_context(tiny_cfg), num_chunks=1, prefill=torch.zeros(1, 16, 2, 4, 6)))
    with pytest.raises(ValueError, match="B = the context's batch 1"):
        next(generate(step, rand_context(tiny_cfg), num_chunks=1, prefill=torch.zeros(2, 16, 3, 4, 6)))


def test_timesteps_follow_the_model_config(tiny_model, tiny_cfg):
    """The network sees t = num_train_timesteps * sigma, read from the config (not a literal 1000)."""
    import dataclasses

    from asd_deploy.schedule import denoising_sigmas

    inner = EagerStep(tiny_model)
    seen = []

    class Spy:
        config = dataclasses.replace(tiny_cfg, num_train_timesteps=500)
        dtype, device, cross_kv = inner.dtype, inner.device, inner.cross_kv

        def __call__(self, x, t, *rest):
            seen.append(t[0, 0].item())
            return inner(x, t, *rest)
    list(generate(Spy(), rand_context(tiny_cfg), num_chunks=2, schedule=Schedule(steps=2, ffe=True, ffe_steps=3)))
    want = [500 * s for s in denoising_sigmas(3)] + [0.0] + [500 * s for s in denoising_sigmas(2)]
    assert seen == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("seed", [-1, 1.5, 2 ** 63, True, "3"])
def test_bad_seeds_are_refused(tiny_model, tiny_cfg, seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        next(generate(EagerStep(tiny_model), rand_context(tiny_cfg), num_chunks=1, seed=seed))
