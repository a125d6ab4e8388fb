"""Smoke test of the latency report: files, schema, and numbers consistent with each other.
No test asserts a speed."""
import json
import sys

import pytest

from asd_deploy.schedule import Schedule
from benchmarks.latency import main


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    main(["--config", "tiny", "--backends", "eager,trt", "--steps", "1", "--ffe", "--chunks", "3", "--repeats", "1",
          "--long-chunks", "8", "--out", str(out)])
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
        assert len(r["chunk_dit_s"]) == 3 and all(x > 0 for x in r["chunk_dit_s"] + r["chunk_vae_s"])
        steady_frames = sum(r["chunk_frames"][1:])
        assert r["fps_dit_only"] == pytest.approx(steady_frames / sum(r["chunk_dit_s"][1:]))
        assert r["fps_with_vae"] == pytest.approx(
            steady_frames / (sum(r["chunk_dit_s"][1:]) + sum(r["chunk_vae_s"][1:])))
        assert r["time_to_first_frame_s"] == pytest.approx(r["text_s"] + r["chunk_dit_s"][0] + r["chunk_vae_s"][0])
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


def test_reports_are_written_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is the `bench` extra: without it the JSON and Markdown reports are still written
    and the plots are skipped with a note (the run used to crash at its very end)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    main(["--config", "default", "--backends", "eager", "--steps", "1", "--chunks", "2", "--repeats", "1",
          "--out", str(tmp_path)])
    assert json.loads((tmp_path / "latency.json").read_text())["backends"][0]["rows"]
    assert (tmp_path / "latency.md").stat().st_size > 0 and not (tmp_path / "fps.png").exists()
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out


def test_long_video_section(report):
    _, res = report
    lv = res["long"]
    assert lv["chunks"] == 8 and len(lv["chunk_s"]) == 8 and lv["ratio_50_over_5"] > 0


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
