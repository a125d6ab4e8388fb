"""The GPU path's CPU-checkable parts: attention over the cache in place (`forward_step_live`)
against `forward_step`, RoPE tables built on the device, the build's validation on the engine's
device, and the loop's pre-drawn noise. The same paths on a GPU: tests/test_gpu.py."""
import pytest
import torch

from asd_deploy import model as model_mod
from asd_deploy.cache import KVCache
from asd_deploy.generator import EagerStep, draw_noise, generate
from asd_deploy.schedule import Schedule
from conftest import ODD, assert_close, rand_context


def _video(step, ctx, **kw):
    return torch.cat([c.clone() for c in generate(step, ctx, **kw)], dim=2)


@pytest.mark.parametrize("cached_chunks", [0, 1, None])  # empty, partly full, all but one
@pytest.mark.parametrize("cfg_name", ["tiny", "odd"])
def test_live_step_equals_functional_step(cfg_name, cached_chunks, tiny_cfg):
    from export.spec import sample_step_inputs

    cfg = tiny_cfg if cfg_name == "tiny" else ODD
    m = model_mod.build_model(cfg, seed=3)
    inputs = sample_step_inputs(cfg, batch=2, seed=4, cached_chunks=cached_chunks)
    live = KVCache(cfg, 2, work_chunk=True)
    live.k[:, :, :cfg.cache_tokens] = inputs[4]
    live.v[:, :, :cfg.cache_tokens] = inputs[5]
    with torch.no_grad():
        ref = m.forward_step(*inputs)
        got = m.forward_step_live(*inputs[:4], live.k, live.v, *inputs[6:])
    for name, a, r in zip(("flow", "k_new", "v_new"), got, ref):
        assert_close(a, r, 1e-5, f"live {name}")
    assert torch.equal(live.k[:, :, :cfg.cache_tokens], inputs[4]), "the live step wrote into the cache itself"
    with pytest.raises(ValueError, match="cache buffers with .* slots"):
        m.forward_step_live(*inputs)


@pytest.mark.parametrize("schedule", [Schedule(steps=1), Schedule(steps=2, ffe=True)])
def test_live_cache_video_equals_plain_through_rolling_window(tiny_model, tiny_cfg, schedule):
    """generate with the live cache (the CUDA default) gives the same video, 6 chunks through the
    window, and its cache holds the same keys."""
    ctx = rand_context(tiny_cfg)
    kw = dict(num_chunks=6, schedule=schedule, seed=9)
    plain_cache, live_cache = KVCache(tiny_cfg), KVCache(tiny_cfg, work_chunk=True)
    plain = _video(EagerStep(tiny_model, live_cache=False), ctx, cache=plain_cache, **kw)
    live = _video(EagerStep(tiny_model, live_cache=True), ctx, cache=live_cache, **kw)
    assert_close(live, plain, 1e-5, "live-cache video")
    assert_close(live_cache.k[:, :, :tiny_cfg.cache_tokens], plain_cache.k, 1e-5, "cached keys")
    assert EagerStep(tiny_model).live_cache is False  # CPU default: the functional step


def test_pre_drawn_noise_is_the_loop_noise():
    """draw_noise gives the values the loop drew between steps (one tensor per draw, same order)."""
    shape, sigmas = (1, 16, 3, 4, 6), Schedule(steps=4).sigmas_for_chunk(0)
    g = torch.Generator().manual_seed(3)
    inline = [torch.randn(shape, generator=g)] + [torch.randn(shape, generator=g) for s in sigmas[1:] if s > 0]
    pre = draw_noise(torch.Generator().manual_seed(3), shape, sigmas, "cpu")
    assert len(pre) == 4 and all(torch.equal(a, b) for a, b in zip(pre, inline))


def test_rope_tables_are_built_on_the_device_with_the_same_values(tiny_cfg, monkeypatch):
    """No tensor from a Python list (a host->device copy, which CUDA-graph capture rejects);
    the frequencies equal the Python-float formula bit for bit."""
    import math

    pos = torch.tensor([6, 7, 8])

    def old(cfg, frames):
        gh, gw = cfg.grid_hw
        parts = []
        for dim, p in zip(cfg.rope_dims, (frames.float(), torch.arange(gh).float(), torch.arange(gw).float())):
            inv = torch.tensor([cfg.rope_theta ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float32)
            parts.append(p[:, None] * inv[None])
        f, (t, h, w) = frames.shape[0], parts
        a = torch.cat([t[:, None, None].expand(f, gh, gw, -1), h[None, :, None].expand(f, gh, gw, -1),
                       w[None, None, :].expand(f, gh, gw, -1)], -1).reshape(f * gh * gw, -1)
        return a.cos(), a.sin()
    want = old(tiny_cfg, pos)

    def no_list_tensors(*a, **k):
        raise AssertionError("rope_tables built a tensor from host data")
    monkeypatch.setattr(torch, "tensor", no_list_tensors)
    got = model_mod.rope_tables(tiny_cfg, pos)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert math.isfinite(got[0].sum().item())


def test_validate_feeds_the_engine_on_its_device_and_precision(tiny_model, tmp_path, monkeypatch):
    """export.build's validation (review #1): inputs go to the engine's device and dtype, outputs
    come back to the CPU before the comparison. A stand-in engine on the meta device checks it."""
    import export.build as build_mod
    from export.spec import sample_context, sample_step_inputs

    cfg = tiny_model.config
    with torch.no_grad():
        ref = tiny_model.forward_step(*sample_step_inputs(cfg, 1, seed=1))
        ref_kv = tiny_model.cross_kv(sample_context(cfg, 1, seed=1))
    seen = []

    class MetaEngine:
        device, dtype = torch.device("meta"), torch.float16

        def __call__(self, *args):
            seen.append([(a.device.type, a.dtype) for a in args])
            return ref

        def cross_kv(self, ctx):
            seen.append([(ctx.device.type, ctx.dtype)])
            return ref_kv

    monkeypatch.setattr(build_mod, "open_engine", lambda folder, manifest, device="cpu": MetaEngine())
    res = build_mod._validate(tmp_path, {"precision": "fp16", "device": "meta"}, tiny_model, 1)
    assert all(d == "meta" for call in seen for d, _ in call)
    assert [dt for _, dt in seen[0]] == [torch.float16] * 6 + [torch.int64] * 2
    assert seen[1] == [("meta", torch.float16)]
    assert res["outputs"]["flow"]["max_abs_err"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_benchmark_refuses_cleanly_without_a_gpu():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--check"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_gpu_benchmark_counts_linear_flops_apart_from_attention():
    from benchmarks.gpu import step_flops_split
    from asd_deploy.config import ModelConfig

    cfg = ModelConfig.preset("wan2.1-1.3b")
    total, linears = step_flops_split(cfg)
    # linears: 30 layers x (4 self + 2 cross q/o + FFN) on 4680 tokens, closed form
    tokens, d, ffn = cfg.tokens_per_chunk, cfg.dim, cfg.ffn_dim
    per_layer = 2 * tokens * (6 * d * d + 2 * d * ffn)
    head_and_embed = 2 * tokens * d * (cfg.out_channels * cfg.patch_volume + cfg.in_channels * cfg.patch_volume)
    time = 2 * cfg.frames_per_chunk * (cfg.freq_dim * d + d * d + d * 6 * d)
    assert linears == cfg.num_layers * per_layer + head_and_embed + time
    assert 0 < linears < total


def test_gpu_report_says_what_failed_and_what_was_cut_short(tmp_path):
    """A failed mode, a decoder that could not be timed and checks stopped at their limit each show
    in the report; the pipelined FPS is the measured one, not max(DiT, decode)."""
    from benchmarks.gpu import markdown, run_checks

    mode = dict(median_ms=100.0, tflops=400.0, pct_of_peak=50.0, linears_pct_of_peak=None, peak_mem_gib=1.0)
    rep = {"gpu": "G", "date": "d", "command": "c", "torch": "t", "cuda": "13", "config": "wan", "cache_tokens": 9,
           "peak_tflops": 800.0, "step_tflop": 40.0, "gemm_share": 0.25, "vae_error": "ImportError: no diffusers",
           "modes": {"eager": mode, "aoti": {"error": "RuntimeError: boom"}},
           "projection": {"best_mode": "eager", "step_ms": 100.0, "frames_per_chunk": 12, "fps_dit_only": 60.0,
                          "graph_speedup": None,
                          "rows": {"tiny": {"decode_ms": 10.0, "fps_sequential": 57.1,
                                            "pipelined_ms_per_chunk": 300.0, "fps_pipelined": 40.0}}},
           "checks": {"command": "pytest", "returncode": None, "tail": ["(stopped)"]}}
    md = markdown(rep)
    assert "| aoti | failed: RuntimeError: boom |" in md
    assert "Decoders not timed: ImportError: no diffusers" in md
    assert "| tiny | 10.0 | 57.1 | 300.0 | **40.0** |" in md
    assert "stopped at its time limit" in md and "CUDA graph vs eager: not measured" in md
    # the checks' whole output lands in the log, and a limit is reported as such (no GPU: all skip)
    res = run_checks(tmp_path / "checks.log", timeout_s=0.01)
    assert res["returncode"] is None and "stopped after" in res["tail"][-1]
    assert (tmp_path / "checks.log").is_file()
