"""Batched stream slots (serve/slots.py) against solo runs: concurrent streams, capacity, freeing,
backpressure, prompt switching (against a re-cache computed directly here), continuation, and
batch-B engines. Latents are compared (max abs: fp32's own error over the video, `video_tol`,
never below 1e-4); no server here (test_serve_app.py)."""
import threading
import time

import numpy as np
import pytest
import torch

from asd_deploy.cache import chunk_visible
from asd_deploy.generator import generate
from asd_deploy.pipeline import Pipeline
from asd_deploy.schedule import Schedule, flow_to_x0, renoise
from asd_deploy.serve.slots import Busy, SlotEngine

from conftest import assert_close, video_tol

PROMPTS = ["a red circle moving right", "a blue square moving left", "a green triangle moving up",
           "a yellow circle moving down", "a purple square"]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("default")


def _frames(cfg, chunks):
    return cfg.pixel_frames_for(chunks * cfg.frames_per_chunk)


def _solo(pipe, prompt, steps, ffe, seed, chunks, prefill=None):
    ctx = pipe.encode_prompt(prompt)
    return torch.cat(list(generate(pipe.step, ctx, num_chunks=chunks, schedule=Schedule(steps, ffe), seed=seed,
                                   prefill=prefill)), dim=2)


def _tol(steps, ffe, chunks):
    return video_tol(Schedule(steps, ffe), chunks)


def _run(stream):
    return [c for c in stream]


@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_streams_equal_their_solo_runs(pipe, n):
    """n streams with different prompts, seeds, step counts and lengths, started at different
    times (so they sit at different frames in the same tick) each give the solo latents."""
    cfg = pipe.config
    engine = SlotEngine(pipe, 4)
    reqs = [(PROMPTS[i], 1 + i % 3, i % 2 == 0, 10 + i, 3 + i) for i in range(n)]
    results = [None] * n
    # opened one after another (each runs from its open on), consumed in parallel
    streams = [engine.open(p, steps=st, ffe=f, seed=sd, frames=_frames(cfg, c), decode=False)
               for p, st, f, sd, c in reqs]

    def run(i):
        with streams[i] as s:
            results[i] = _run(s)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    for i, (prompt, steps, ffe, seed, chunks) in enumerate(reqs):
        got = results[i]
        assert [c.index for c in got] == list(range(chunks))
        assert_close(torch.cat([c.latents for c in got], 2), _solo(pipe, prompt, steps, ffe, seed, chunks),
                     _tol(steps, ffe, chunks),
                     f"stream {i} of {n} vs its solo run")
    assert engine.ticks < sum(r[4] * (r[1] + 1) + (3 if r[2] else 0) for r in reqs), "the streams shared ticks"


def test_full_house_refused_and_close_frees_the_slot_at_once(pipe):
    cfg = pipe.config
    engine = SlotEngine(pipe, 2, buffer_chunks=1)
    long = _frames(cfg, 40)
    a = engine.open(PROMPTS[0], frames=long, decode=False)
    b = engine.open(PROMPTS[1], frames=long, decode=False)
    with pytest.raises(Busy, match="all 2 stream slots are busy"):
        engine.open(PROMPTS[2], decode=False)
    assert engine.active == 2
    a.next_chunk()
    a.close()
    assert engine.active == 1 and a.next_chunk() is None and a.end_reason == "closed by client"
    c = engine.open(PROMPTS[2], seed=3, frames=_frames(cfg, 3), decode=False)  # the freed slot, at once
    assert c.row == a.row
    assert_close(torch.cat([x.latents for x in _run(c)], 2), _solo(pipe, PROMPTS[2], 1, True, 3, 3), _tol(1, True, 3),
                 "a stream in a reused slot")
    b.close()
    assert engine.active == 0 and engine.healthy
    engine.close()


def test_stalled_consumer_is_dropped_others_unaffected(pipe):
    cfg = pipe.config
    engine = SlotEngine(pipe, 2, buffer_chunks=1, stall_timeout_s=0.5)
    stalled = engine.open(PROMPTS[0], frames=_frames(cfg, 40), decode=False)
    ok = engine.open(PROMPTS[1], seed=7, frames=_frames(cfg, 4), decode=False)
    got = []
    for c in ok:  # a consumer that keeps up, slower than the stall timeout in total
        got.append(c)
        time.sleep(0.25)
    assert_close(torch.cat([c.latents for c in got], 2), _solo(pipe, PROMPTS[1], 1, True, 7, 4), _tol(1, True, 4),
                 "the healthy stream beside a stalled one")
    deadline = time.time() + 10
    while stalled.end_reason is None and time.time() < deadline:
        time.sleep(0.05)
    assert stalled.end_reason and stalled.end_reason.startswith("dropped"), stalled.end_reason
    assert engine.active == 0 and engine.healthy
    taken = [c for c in stalled]  # what it had buffered, then the end
    assert len(taken) <= 1
    engine.close()


def _reference(pipe, prompts, seed, chunks, switch_after=None, mode="recache", steps=1, ffe=True):
    """Latents [1, C, F, h, w] computed directly from the eager step, with the cache spelled out
    as the keys/values of the chunks the window (cache.chunk_visible) shows the next chunk, in
    video order. After chunk `switch_after`, prompt 1 takes over: "recache" recomputes the window's
    keys/values under it in video order (each attending to those recomputed before it); "cut"
    forgets them and restarts the positions (and the FFE chunk) at 0; noise continues."""
    step, cfg = pipe.step, pipe.config
    fpc, tpc, dt = cfg.frames_per_chunk, cfg.tokens_per_chunk, step.dtype
    schedule, gen = Schedule(steps, ffe), torch.Generator().manual_seed(seed)
    cross = [step.cross_kv(pipe.encode_prompt(p)) for p in prompts]
    kv, latents, out = {}, {}, []
    ck, cv = cross[0]
    base, first = 0, 0  # chunk numbering restarts at a cut

    def call(x, t, chunk, visible):
        cache_k, cache_v = torch.zeros(cfg.cache_shape(1), dtype=dt), torch.zeros(cfg.cache_shape(1), dtype=dt)
        for j, c in enumerate(visible):
            cache_k[:, :, j * tpc:(j + 1) * tpc], cache_v[:, :, j * tpc:(j + 1) * tpc] = kv[c]
        return step(x.to(dt), torch.full((1, fpc), t, dtype=dt), ck, cv, cache_k, cache_v,
                    torch.tensor([chunk * fpc]), torch.tensor([len(visible) * tpc]))

    for n in range(chunks):
        q = n - base
        visible = [c for c in sorted(kv) if chunk_visible(cfg, q, c)]
        x = torch.randn(cfg.chunk_shape(1), generator=gen)
        sigmas = schedule.sigmas_for_chunk(n - first)
        for i, sigma in enumerate(sigmas[:-1]):
            flow, _, _ = call(x, 1000.0 * sigma, q, visible)
            x0 = flow_to_x0(x, flow.float(), sigma)
            if sigmas[i + 1] > 0:
                x = renoise(x0, torch.randn(x.shape, generator=gen), sigmas[i + 1])
        out.append(x0)
        latents[q] = x0
        if switch_after is not None and n == switch_after:
            ck, cv = cross[1]
            if mode == "cut":
                kv, latents, base, first = {}, {}, n + 1, n + 1
                continue
            window = [c for c in sorted(latents) if chunk_visible(cfg, q + 1, c)]
            kv = {}
            for c in window:
                _, k, v = call(latents[c], 0.0, c, list(kv))
                kv[c] = (k, v)
            continue
        _, k, v = call(x0, 0.0, q, visible)
        kv[q] = (k, v)
    return torch.cat(out, dim=2)


def test_reference_without_switch_is_the_solo_run(pipe):
    assert_close(_reference(pipe, PROMPTS[:1], 5, 7), _solo(pipe, PROMPTS[0], 1, True, 5, 7), _tol(1, True, 7),
                 "the direct reference (no switch) vs generate()")


@pytest.mark.parametrize("mode", ["recache", "cut"])
def test_prompt_switch_takes_effect_from_the_next_chunk(pipe, mode):
    """Switched mid-stream (after the window has wrapped): chunks before the switch are the solo
    run of prompt A, chunks from it on differ from it and equal the reference switch."""
    cfg = pipe.config
    chunks = cfg.cache_chunks + 4
    engine = SlotEngine(pipe, 2, buffer_chunks=1)
    other = engine.open(PROMPTS[3], seed=1, frames=_frames(cfg, chunks), decode=False)  # a neighbour row
    s = engine.open(PROMPTS[0], seed=5, frames=_frames(cfg, chunks), decode=False, switch_mode=mode)
    got = [s.next_chunk() for _ in range(cfg.cache_chunks)]
    s.switch_prompt(PROMPTS[1])
    got += _run(s)
    _run(other)
    engine.close()
    switched = [c.index for c in got if c.switched]
    assert len(switched) == 1 and cfg.cache_chunks <= switched[0] < chunks, switched
    at = switched[0]
    assert [c.prompt for c in got] == [PROMPTS[0]] * at + [PROMPTS[1]] * (chunks - at)
    lat = torch.cat([c.latents for c in got], 2)
    fpc = cfg.frames_per_chunk
    solo_a = _solo(pipe, PROMPTS[0], 1, True, 5, chunks)
    assert_close(lat[:, :, :at * fpc], solo_a[:, :, :at * fpc], _tol(1, True, chunks), "before the switch")
    for n in range(at, chunks):
        diff = (lat[:, :, n * fpc:(n + 1) * fpc] - solo_a[:, :, n * fpc:(n + 1) * fpc]).abs().max().item()
        assert diff > 1e-2, f"chunk {n} after the switch is still prompt A's (max diff {diff:.2e})"
    assert_close(lat, _reference(pipe, PROMPTS[:2], 5, chunks, switch_after=at - 1, mode=mode),
                 _tol(1, True, chunks),
                 f"{mode} switch vs the reference computed directly")


def test_continuation_prefill_equals_generate_with_prefill(pipe):
    cfg = pipe.config
    init = _solo(pipe, PROMPTS[2], 1, True, 9, 2)  # clean latents of 2 chunks to continue from
    engine = SlotEngine(pipe, 2)
    s = engine.open(PROMPTS[0], seed=4, frames=_frames(cfg, 3), init=init, decode=False)
    lat = torch.cat([c.latents for c in _run(s)], 2)
    engine.close()
    ref = _solo(pipe, PROMPTS[0], 1, True, 4, 3, prefill=init)
    assert_close(lat, ref, _tol(1, True, 5), "continued stream vs generate(prefill=)")
    assert (ref - _solo(pipe, PROMPTS[0], 1, True, 4, 3)).abs().max() > 1e-2, "the prefill changed nothing"


def test_bad_requests(pipe):
    engine = SlotEngine(pipe, 1)
    with pytest.raises(ValueError, match=r"steps must be an integer in 1..4"):
        engine.open(PROMPTS[0], steps=5)
    with pytest.raises(ValueError, match=r"frames=10 is not 1\+4k"):
        engine.open(PROMPTS[0], frames=10)
    with pytest.raises(ValueError, match="switch mode must be one of"):
        engine.open(PROMPTS[0], switch_mode="swap")
    with pytest.raises(ValueError, match="init latents must be"):
        engine.open(PROMPTS[0], init=torch.zeros(1, 2, 3, 4, 5))
    assert engine.active == 0
    engine.close()
    with pytest.raises(ValueError, match="--batch 2"):
        SlotEngine(Pipeline(pipe.config, _Batched(pipe.step, 3), pipe.text_encoder, pipe.vae), 2)


class _Batched:
    """A step that reports a static batch (as engines do)."""

    def __init__(self, step, batch):
        self.step, self.batch, self.name = step, batch, "ort"
        self.config, self.dtype, self.device = step.config, step.dtype, step.device


def _engine_pipe(tmp_path_factory, backend, opset, batch):
    from export.build import build

    out = tmp_path_factory.mktemp(f"engines-{backend}")
    eng = build(backend=backend, opset=opset, batch=batch, out=out, log=lambda m: None, decoder="vae")  # the one checked
    return Pipeline.from_pretrained("default", backend=backend, engine=str(eng), batch=batch)


@pytest.mark.parametrize("backend,opset", [pytest.param("ort", 18, marks=pytest.mark.slow),
                                           pytest.param("aoti", None, marks=pytest.mark.slow)])  # engine builds
def test_batched_engine_slots_equal_eager_solo(pipe, tmp_path_factory, backend, opset):
    """A batch-3 engine (per-row positions [3]) serving 2 streams at different frames: each equals
    the eager solo run; and it refuses --max-streams other than its batch."""
    cfg = pipe.config
    epipe = _engine_pipe(tmp_path_factory, backend, opset, 3)
    with pytest.raises(ValueError, match="built with --batch 2"):
        SlotEngine(epipe, 2)
    engine = SlotEngine(epipe, 3)
    a = engine.open(PROMPTS[0], steps=2, ffe=True, seed=2, frames=_frames(cfg, 5), decode=False)
    first = a.next_chunk()
    b = engine.open(PROMPTS[1], steps=1, ffe=False, seed=3, frames=_frames(cfg, 4), decode=False)
    lat_a = torch.cat([first.latents] + [c.latents for c in _run(a)], 2)
    lat_b = torch.cat([c.latents for c in _run(b)], 2)
    engine.close()
    assert_close(lat_a, _solo(pipe, PROMPTS[0], 2, True, 2, 5), _tol(2, True, 5), f"{backend} batch-3 slot a vs eager solo")
    assert_close(lat_b, _solo(pipe, PROMPTS[1], 1, False, 3, 4), _tol(1, False, 4), f"{backend} batch-3 slot b vs eager solo")
    # the engine's decoder graphs are batch 1 whatever the DiT's batch (each slot decodes its own
    # stream): a decoded slot gives the eager pipeline's frames up to uint8 rounding
    assert epipe.info["decoder"] == f"vae ({backend} engine)", epipe.info
    engine = SlotEngine(epipe, 3)
    c = engine.open(PROMPTS[0], steps=1, ffe=False, seed=4, frames=_frames(cfg, 2))
    got = np.concatenate([x.frames for x in _run(c)])
    engine.close()
    ref = pipe(PROMPTS[0], steps=1, ffe=False, seed=4, frames=_frames(cfg, 2))[0]
    diff = np.abs(got.astype(int) - ref)
    assert got.shape == ref.shape and diff.max() <= 2 and (diff > 0).mean() < 1e-2, (diff.max(), (diff > 0).mean())


def test_live_cache_step_in_slots(pipe):
    """A step that attends to the cache in place (EagerStep(live_cache=True), the CUDA default)
    gets the work-chunk cache layout and gives the same streams."""
    import copy

    from asd_deploy.generator import EagerStep

    cfg = pipe.config
    live = copy.copy(pipe)
    live.step = EagerStep(pipe.step.model, live_cache=True)
    engine = SlotEngine(live, 2)
    assert engine.cache_k.shape[2] == cfg.cache_tokens + cfg.tokens_per_chunk
    a = engine.open(PROMPTS[0], seed=1, frames=_frames(cfg, 5), decode=False)
    b = engine.open(PROMPTS[1], seed=2, steps=2, frames=_frames(cfg, 4), decode=False)
    lat_a, lat_b = (torch.cat([c.latents for c in _run(s)], 2) for s in (a, b))
    engine.close()
    assert_close(lat_a, _solo(pipe, PROMPTS[0], 1, True, 1, 5), _tol(1, True, 5), "live-cache slot a")
    assert_close(lat_b, _solo(pipe, PROMPTS[1], 2, True, 2, 4), _tol(2, True, 4), "live-cache slot b")


def test_slot_timesteps_follow_the_model_config(pipe):
    """The slot program hands the step t = num_train_timesteps * sigma from the config (as
    generator.generate does), not a literal 1000."""
    import dataclasses
    from types import SimpleNamespace

    from asd_deploy.schedule import denoising_sigmas

    inner, seen = pipe.step, []

    class Spy:
        config = dataclasses.replace(pipe.config, num_train_timesteps=500)
        dtype, device, cross_kv = inner.dtype, inner.device, inner.cross_kv

        def __call__(self, x, t, *rest):
            seen.append(t[0, 0].item())
            return inner(x, t, *rest)

    spy = Spy()
    engine = SlotEngine(SimpleNamespace(step=spy, config=spy.config, text_encoder=pipe.text_encoder), 1)
    try:
        with engine.open(PROMPTS[0], steps=2, ffe=True, seed=0, frames=_frames(pipe.config, 2), decode=False) as s:
            _run(s)
    finally:
        engine.close()
    # chunk 0 with FFE (4 steps), its clean pass (t = 0), chunk 1 at 2 steps
    want = [500 * x for x in denoising_sigmas(4)] + [0.0] + [500 * x for x in denoising_sigmas(2)]
    assert seen == pytest.approx(want, rel=1e-6)


def test_serve_decodes_with_the_decoder_it_is_given():
    """`serve --decoder tiny` streams through the model's tiny decoder (a server's decode is its
    cost per stream); the default stays the VAE."""
    from asd_deploy.cli import _build_parser, _pipeline

    for argv, want in ((["serve"], "vae"), (["serve", "--decoder", "tiny"], "tiny")):
        args = _build_parser().parse_args(argv)
        assert _pipeline(args, batch=args.max_streams).info["decoder"] == want
