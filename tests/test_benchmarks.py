"""Smoke test of the latency report: files, schema, and numbers consistent with each other and
computed from what was timed (the raw per-chunk timings in the JSON). No test asserts a speed."""
import json
import sys

import numpy as np
import pytest

from asd_deploy.schedule import Schedule
from benchmarks.latency import main


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    main(["--config", "tiny", "--backends", "eager,trt", "--steps", "1", "--ffe", "--chunks", "3", "--repeats", "1",
          "--e2e-chunks", "3", "--long-chunks", "8", "--out", str(out)])
    return out, json.loads((out / "latency.json").read_text())


def test_files_and_machine(report):
    out, res = report
    for f in ("latency.json", "latency.md", "chunk_latency.png", "fps.png"):
        assert (out / f).stat().st_size > 0, f
    for k in ("cpu", "cores", "torch_threads", "torch", "onnxruntime"):
        assert k in res["machine"]
    assert res["matmul_peak_gflops"] > 0 and res["step_gflop"] > 0 and res["kv_cache_bytes"] > 0
    # the peak is the faster of torch's BLAS and oneDNN, both measured in this run
    assert "torch.mm" in res["matmul_rates_gflops"]
    assert res["matmul_peak_gflops"] == max(res["matmul_rates_gflops"].values())


def test_rows_are_consistent(report):
    _, res = report
    eager = next(b for b in res["backends"] if b["backend"] == "eager")
    scheds = [r["schedule"] for r in eager["rows"]]
    assert "1-step" in scheds and "4-step" in scheds and any("FFE" in s for s in scheds)
    for r in eager["rows"]:
        assert len(r["chunk_dit_s"]) == 3 and all(x > 0 for x in r["chunk_dit_s"])
        steady_frames = sum(r["chunk_frames"][1:])
        assert r["fps_dit_only"] == pytest.approx(steady_frames / sum(r["chunk_dit_s"][1:]))
        assert r["time_to_first_frame_dit_s"] == pytest.approx(r["text_s"] + r["chunk_dit_s"][0])
        # chunk c's time covers chunk c-1's clean pass and chunk c's own steps: the FLOPs count both
        sched = Schedule(steps=r["steps"], ffe=r["ffe"])
        assert r["chunk_step_calls"] == [sched.steps_for_chunk(c) + (c > 0) for c in range(3)]
        assert r["achieved_gflops"] == pytest.approx(
            sum(r["chunk_step_calls"][1:]) * res["step_gflop"] / sum(r["chunk_dit_s"][1:]))
        assert 0 < r["pct_of_matmul_peak"] == pytest.approx(100 * r["achieved_gflops"] / res["matmul_peak_gflops"])
    assert set(eager["speedup_vs_self_forcing"]) == set(scheds) - {"4-step"}


def test_gpu_rows_never_carry_numbers(report):
    out, res = report
    trt = next(b for b in res["backends"] if b["backend"] == "trt")
    assert "not_run" in trt and "rows" not in trt
    md = (out / "latency.md").read_text()
    assert "| trt | - | not run" in md and "eager+cudagraph | - | not run: no GPU" in md
    assert "NOT a measurement" in md


def test_diffusers_side_by_side(report):
    out, res = report
    rows = res["vs_diffusers"]["rows"]
    assert set(rows) == {"diffusers", "ours_forward_train", "ours_forward_step_full_cache"}
    for name, r in rows.items():  # every ratio is diffusers' median over that row's, all timed in this run
        assert r["median"] > 0 and r["speedup_vs_diffusers"] == pytest.approx(
            rows["diffusers"]["median"] / r["median"]), name
    assert "against diffusers' WanTransformer3DModel" in (out / "latency.md").read_text()


@pytest.mark.slow  # a benchmark run in a subprocess (~9 s)
def test_reports_are_written_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is the `bench` extra: without it the JSON and Markdown reports are still written
    and the plots are skipped with a note (the run used to crash at its very end)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    main(["--config", "default", "--backends", "eager", "--steps", "1", "--chunks", "2", "--repeats", "1",
          "--out", str(tmp_path)])
    assert json.loads((tmp_path / "latency.json").read_text())["backends"][0]["rows"]
    assert (tmp_path / "latency.md").stat().st_size > 0 and not (tmp_path / "fps.png").exists()
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out


def test_end_to_end_rows_are_computed_from_their_timings(report):
    """Per backend and decoder, three schedules; every summary figure from the per-chunk
    readiness times, decode/DiT times and RSS readings the row carries."""
    out, res = report
    rows = res["e2e"]
    assert {(r["backend"], r["decoder"], r["steps"], r["ffe"]) for r in rows} == \
        {("eager", d, s, f) for d in ("vae", "tiny") for s, f in ((1, True), (1, False), (4, False))}
    for r in rows:
        s = r["summary"]
        ready, frames = s["ready_s"], s["chunk_frames"]
        assert len(ready) == 3 and all(b > a for a, b in zip(ready, ready[1:]))
        assert frames == [9, 12, 12] and s["frames"] == 33
        assert s["time_to_first_frame_s"] == ready[0] and s["time_to_first_frame_s"] > s["split_s"]["text"] > 0
        assert s["interval_s"] == pytest.approx([b - a for a, b in zip(ready, ready[1:])])
        assert s["fps_end_to_end"] == pytest.approx(24 / (ready[-1] - ready[0]))
        assert s["chunk_p50_s"] == pytest.approx(np.percentile(s["interval_s"], 50))
        assert s["jitter_s"] == pytest.approx(np.percentile(s["interval_s"], 99) - s["chunk_p50_s"])
        assert s["split_s"]["dit"] == pytest.approx(sum(s["chunk_dit_s"]))
        assert s["split_s"]["decode"] == pytest.approx(sum(s["chunk_decode_s"])) and s["split_s"]["decode"] > 0
        assert s["split_pct_of_wall"]["dit"] == pytest.approx(100 * s["split_s"]["dit"] / s["video_wall_s"])
        assert len(s["rss_mb"]) == 3 and min(s["rss_mb"]) > 0
        assert r["decoder_impl"] == r["decoder"] and r["weights"] == "random weights"  # --config tiny: random VAE too
    md = (out / "latency.md").read_text()
    assert "## End to end" in md and "| eager | tiny (tiny, random weights) |" in md


def test_goal_ratios_come_from_the_rows(report):
    out, res = report
    g = res["goals"]
    rows = {(r["decoder"], r["steps"], r["ffe"]): r for r in res["e2e"]}
    dit = {(r["steps"], r["ffe"]): r for r in res["backends"][0]["rows"]}
    for d in ("vae", "tiny"):
        deployed, e = rows[(d, 1, True)], g["e2e_over_dit_only"][f"eager / {d}"]
        assert e["dit_only_fps"] == dit[(1, False)]["fps_dit_only"]
        assert e["ratio"] == pytest.approx(deployed["summary"]["fps_end_to_end"] / e["dit_only_fps"])
        assert e["goal"] == (0.5 if d == "vae" else 0.8)
        t = g["ttff_over_steady_chunk"][f"eager / {d}"]
        s = deployed["summary"]
        assert t["ratio"] == pytest.approx(s["time_to_first_frame_s"] / s["chunk_p50_s"])
        # the same first frame for a prompt already encoded: timed in its own runs, which encoded nothing
        c = g["ttff_over_steady_chunk"][f"eager / {d} / prompt cached"]
        assert c["ttff_s"] == deployed["time_to_first_frame_cached_prompt_s"] > 0
        assert c["ratio"] == pytest.approx(c["ttff_s"] / s["chunk_p50_s"])
        assert deployed["cached_prompt_text_s"] < 0.2 * s["split_s"]["text"]
        for sched in ("1-step", "1-step + FFE (4 steps on chunk 0)"):
            o = g["one_step_over_self_forcing"][f"eager / {d} / {sched}"]
            one = rows[(d, 1, sched != "1-step")]["summary"]["video_wall_s"]
            assert o["ratio"] == pytest.approx(rows[(d, 4, False)]["summary"]["video_wall_s"] / one)
    lv, ls = res["long"], g["long_stream"]
    assert lv["chunks"] == 8 and len(lv["chunk_s"]) == len(lv["rss_mb"]) == 8 and lv["ref_chunk"] == 4
    assert ls["rss"]["ratio"] == pytest.approx(lv["rss_mb"][7] / lv["rss_mb"][4])
    assert ls["chunk_time"]["ratio"] == pytest.approx(np.median(lv["chunk_s"][5:8]) / np.median(lv["chunk_s"][2:7]))
    assert "chunk 7" in ls["note"] and lv["setting"] == "eager + tiny decoder, 1-step + FFE"
    md = (out / "latency.md").read_text()
    assert "## Issue 15's goals" in md and "RSS chunk 7 / chunk 4" in md and "(FFE, prompt cached) | eager / tiny |" in md
    assert "RSS chunk 7 / chunk 4" in md and "end-to-end / DiT-only FPS" in md


def test_step_ceiling_accounts_for_the_whole_step(tmp_path):
    """The ceiling's kernel inventory is the step's FLOPs (all but the 3-row time embedding), every
    kernel is timed, and the bound takes each shape's fastest library."""
    from asd_deploy.config import PRESETS
    from benchmarks.ceiling import main as ceiling_main, step_attentions, step_linears

    res = ceiling_main(["--config", "tiny", "--repeats", "1", "--out", str(tmp_path)])
    cfg = PRESETS["tiny"]
    linear = sum(2 * m * k * n for m, k, n in step_linears(cfg))
    attention = cfg.num_layers * sum(4 * cfg.num_heads * lq * lk * cfg.head_dim
                                     for lq, lk in step_attentions(cfg).values())
    f, d = cfg.frames_per_chunk, cfg.dim
    time_embedding = 2 * f * (cfg.freq_dim * d + d * d + d * 6 * d)
    assert linear + attention + time_embedding == pytest.approx(res["step_gflop"] * 1e9, rel=1e-9)
    rows, c = res["kernels"], res["ceiling"]
    assert all(r["median_s"] > 0 for r in rows.values())
    fastest = {}
    for r in rows.values():
        key = (r["kind"], r["shape"])
        fastest[key] = min(fastest.get(key, float("inf")), r["count_per_step"] * r["median_s"])
    assert c["kernels_only_step_s"] == pytest.approx(sum(fastest.values()))
    assert c["kernels_only_pct_of_peak"] == pytest.approx(
        100 * res["step_gflop"] / c["kernels_only_step_s"] / res["matmul_peak_gflops"])
    md = (tmp_path / "ceiling-tiny.md").read_text()
    shapes = set(step_linears(cfg))
    assert sum(md.count(f"| linear {m}x{k}x{n} ") for m, k, n in shapes) == 2 * len(shapes)  # oneDNN, torch.mm


def test_named_tiny_decoders_are_timed_beside_the_others(tmp_path):
    """`--decoders vae,tiny,lite=FOLDER`: a second tiny decoder gets its own rows in the same run;
    a bad entry says what was expected."""
    from types import SimpleNamespace

    from asd_deploy.decoders.tiny import TINY_DECODER_ARCHS, TinyDecoder
    from benchmarks.latency import decoders_for

    TinyDecoder(TINY_DECODER_ARCHS["tiny"]).save(tmp_path / "td")
    args = SimpleNamespace(decoders=["vae", f"lite={tmp_path / 'td'}"], config="default", vae=None, tiny_decoder=None)
    got = decoders_for(args)
    assert list(got) == ["vae", "lite"] and got["lite"][:2] == ("tiny", str(tmp_path / "td"))
    for bad in (f"tiny={tmp_path / 'td'}", f"x={tmp_path}", "=x", "nope"):
        with pytest.raises(ValueError, match="NAME="):
            decoders_for(SimpleNamespace(decoders=[bad], config="default", vae=None, tiny_decoder=None))
