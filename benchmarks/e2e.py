"""End-to-end latency the way users ask for it: frames out of `Pipeline.stream`, decode included.

Owns: `e2e_run` (one video through a pipeline: when each chunk's frames were ready, the text /
DiT / decode split the stream recorded, current RSS after each chunk), `summarize_e2e` (time to
first frame, steady end-to-end FPS, per-chunk p50/p99 and jitter of the interval between chunks,
the split), `long_stream` (current RSS and chunk time over a long rolling-window stream) and
`goal_ratios` (issue 15's goals, each computed from rows of the same run). Every figure is
computed from what was timed here; nothing is carried over from another run. Does not own the
report (`latency.py`) or what it times (`asd_deploy.pipeline`).

RSS is the process's current resident set (psutil), read after every chunk: a peak such as
`ru_maxrss` cannot show growth (a leak would read flat).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

PROMPT = "a red circle moving right on a white background"


def current_rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def e2e_run(pipe, chunks: int, steps: int, ffe: bool, seed: int = 0, prompt: str = PROMPT,
            fresh_prompt: bool = True) -> dict:
    """One video of `chunks` chunks, the prompt encoded afresh (time to first frame includes it),
    or with `fresh_prompt=False` taken from the pipeline's prompt cache when it is there (a
    repeated prompt, or one encoded ahead of the request)."""
    cfg = pipe.config
    if fresh_prompt:
        with pipe._prompt_lock:
            pipe._prompt_cache.pop(prompt, None)
    s = pipe.stream(prompt, steps=steps, ffe=ffe, seed=seed, frames=cfg.pixel_frames_for(chunks * cfg.frames_per_chunk),
                    keep_latents=False)
    ready, rss, frames, dit, dec = [], [], [], [], []
    t0 = time.perf_counter()
    for f in s:
        ready.append(time.perf_counter() - t0)
        rss.append(current_rss_mb())
        frames.append(int(f.shape[0]))
        last = s.stats.chunks[-1]  # the stream keeps only its recent timings: read each as it comes
        dit.append(last.dit_s)
        dec.append(last.vae_s)
    return {"ready_s": ready, "rss_mb": rss, "chunk_frames": frames, "text_s": s.stats.text_s,
            "dit_s": dit, "decode_s": dec}


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def summarize_e2e(runs: list[dict]) -> dict:
    """Medians over repeated runs of the same setting, per chunk, then the figures users ask for:
    time to first frame; steady end-to-end FPS (frames after the first chunk / the time they
    took); the interval between consecutive chunks' frames (p50, p99, jitter = p99 - p50, std);
    where the time went (text, DiT, decode, summed over the video; with pipelining DiT and
    decode overlap, so their sum can exceed the wall time)."""
    n = len(runs[0]["ready_s"])
    med = statistics.median
    ready = [med(r["ready_s"][i] for r in runs) for i in range(n)]
    frames = runs[0]["chunk_frames"]
    intervals = [ready[i] - ready[i - 1] for i in range(1, n)]
    dit = [med(r["dit_s"][i] for r in runs) for i in range(n)]
    dec = [med(r["decode_s"][i] for r in runs) for i in range(n)]
    text = med(r["text_s"] for r in runs)
    wall = ready[-1]
    return {"chunks": n, "frames": sum(frames), "chunk_frames": frames, "ready_s": ready, "interval_s": intervals,
            "time_to_first_frame_s": ready[0],
            "fps_end_to_end": sum(frames[1:]) / (ready[-1] - ready[0]) if n > 1 else float("nan"),
            "video_wall_s": wall, "video_wall_s_all_runs": [r["ready_s"][-1] for r in runs],
            "chunk_p50_s": _pct(intervals, 50) if intervals else float("nan"),
            "chunk_p99_s": _pct(intervals, 99) if intervals else float("nan"),
            "jitter_s": _pct(intervals, 99) - _pct(intervals, 50) if intervals else float("nan"),
            "chunk_std_s": statistics.pstdev(intervals) if len(intervals) > 1 else 0.0,
            "split_s": {"text": text, "dit": sum(dit), "decode": sum(dec)},
            "split_pct_of_wall": {"text": 100 * text / wall, "dit": 100 * sum(dit) / wall,
                                  "decode": 100 * sum(dec) / wall},
            "chunk_dit_s": dit, "chunk_decode_s": dec, "rss_mb": runs[-1]["rss_mb"]}


def _window(xs, i, k=2):
    return statistics.median(xs[max(0, i - k):i + k + 1])


def long_stream(pipe, chunks: int, ref: int = 50, seed: int = 0) -> dict:
    """A `chunks`-chunk rolling-window stream (1 step + FFE): current RSS and the interval of
    every chunk; the end against chunk `ref` (min(ref, chunks // 2) when shorter), chunk times as
    5-chunk medians (less noise)."""
    run = e2e_run(pipe, chunks, steps=1, ffe=True, seed=seed)
    ready, rss = run["ready_s"], run["rss_mb"]
    t = [ready[0]] + [ready[i] - ready[i - 1] for i in range(1, len(ready))]
    ref = max(1, min(ref, chunks // 2))
    end = chunks - 1
    return {"chunks": chunks, "ref_chunk": ref, "end_chunk": end, "chunk_s": t, "rss_mb": rss,
            "rss_ref_mb": rss[ref], "rss_end_mb": rss[end], "rss_ratio_end_over_ref": rss[end] / rss[ref],
            "time_ref_s": _window(t, ref), "time_end_s": _window(t, end),
            "time_ratio_end_over_ref": _window(t, end) / _window(t, ref)}


def goal_ratios(rows: list[dict], long: dict | None) -> dict:
    """Issue 15's goals from this run's rows (`latency.py`'s end-to-end rows: backend, decoder,
    schedule, summary, dit_only_fps). Missing inputs give no entry, never a number."""
    goals: dict = {"e2e_over_dit_only": {}, "ttff_over_steady_chunk": {}, "one_step_over_self_forcing": {}}
    by = {(r["backend"], r["decoder"], r["steps"], r["ffe"]): r for r in rows}
    for (b, d, steps, ffe), r in by.items():
        s, sched = r["summary"], r["schedule"]
        if (steps, ffe) == (1, True):  # as deployed: 1 step, First-Frame Enhancement
            goals["e2e_over_dit_only"][f"{b} / {d}"] = {
                "e2e_fps": s["fps_end_to_end"], "dit_only_fps": r["dit_only_fps"],
                "ratio": s["fps_end_to_end"] / r["dit_only_fps"], "goal": 0.5 if d == "vae" else 0.8}
            goals["ttff_over_steady_chunk"][f"{b} / {d}"] = {
                "ttff_s": s["time_to_first_frame_s"], "steady_chunk_s": s["chunk_p50_s"],
                "ratio": s["time_to_first_frame_s"] / s["chunk_p50_s"], "goal": 1.5}
            if "time_to_first_frame_cached_prompt_s" in r:
                t = r["time_to_first_frame_cached_prompt_s"]
                goals["ttff_over_steady_chunk"][f"{b} / {d} / prompt cached"] = {
                    "ttff_s": t, "steady_chunk_s": s["chunk_p50_s"], "ratio": t / s["chunk_p50_s"], "goal": 1.5}
        sf = by.get((b, d, 4, False))  # the Self-Forcing recipe: 4 steps + the clean pass
        if sf and steps == 1:
            goals["one_step_over_self_forcing"][f"{b} / {d} / {sched}"] = {
                "self_forcing_video_s": sf["summary"]["video_wall_s"], "asd_video_s": s["video_wall_s"],
                "ratio": sf["summary"]["video_wall_s"] / s["video_wall_s"], "goal": 2.0}
    if long:
        goals["long_stream"] = {
            "rss": {"ref_chunk": long["ref_chunk"], "end_chunk": long["end_chunk"],
                    "ratio": long["rss_ratio_end_over_ref"], "goal": "within 5% (0.95-1.05)"},
            "chunk_time": {"ref_chunk": long["ref_chunk"], "end_chunk": long["end_chunk"],
                           "ratio": long["time_ratio_end_over_ref"], "goal": 1.1},
            "note": None if long["end_chunk"] >= 999 else
            f"the goal is stated at chunk 1000 vs 50; this run went to chunk {long['end_chunk']}"}
    return goals
