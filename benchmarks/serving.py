"""Serving benchmark: many streams on one engine (serve/slots.py), as the server runs them.

For each stream count N (default 1, 2, 4, 8) a `SlotEngine` with N slots (the static batch of
the step) serves N concurrent streams of `--chunks` chunks, each consumed by its own thread that
decodes with the VAE and encodes JPEG frames, as the WebSocket route does (no network). Reports:
aggregate FPS (all frames / wall time from the opens to the last frame), per stream the time to
first frame, p50/p99 chunk latency (a chunk's first tick to its decoded frames) and p99 gap between
consecutive chunks (what a viewer waits), batched step calls per second, and prompt-switch latency
(request to the first chunk under the new prompt, decoded) for the re-cache and cut modes.

    python -m benchmarks.serving [--config default] [--backend eager] [--streams 1,2,4,8]
        [--chunks 12] [--steps 1] [--out DIR]

Engines (`--backend ort|aoti`) need one build per N: `python -m export.build --backend ort --batch N`.
Writes <out>/serving.json (machine described) and serving.md. Timings on a shared machine are
indicative only; the committed figures come from a quiet run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, report_dir, write_json

PROMPTS = ["a red circle moving right on a white background", "a blue square moving left on a white background",
           "a green triangle moving up on a white background", "a yellow circle moving down on a white background"]


def _pipeline(args, batch: int):
    from asd_deploy.pipeline import Pipeline

    if args.config == "default":
        return Pipeline.from_pretrained("default", backend=args.backend, batch=batch, decoder=args.decoder)
    if args.decoder != "vae":
        raise ValueError(f"--decoder {args.decoder}: a random-weights preset has no tiny decoder; use --config default")
    return Pipeline.from_checkpoint("random", args.config, backend=args.backend, batch=batch)


def _p(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def _consume(stream, out: dict, switch_at: int | None = None, switch_to: str | None = None):
    """Take every chunk (decoded in this thread), encode its frames as JPEG, note the timings."""
    from asd_deploy.serve.media import image_bytes

    rows, requested = [], None
    for c in stream:
        for f in c.frames:
            image_bytes(f)
        rows.append({"index": c.index, "frames": len(c.frames), "latency_s": c.latency_s, "gen_s": c.gen_s,
                     "decode_s": c.decode_s, "ready_s": c.ready_s, "arrived": time.perf_counter(),
                     "switched": c.switched})
        if c.switched and requested is not None:
            out["switch_s"] = rows[-1]["arrived"] - requested
        if switch_at is not None and c.index == switch_at:
            requested = time.perf_counter()
            stream.switch_prompt(switch_to)
    out["rows"], out["end"] = rows, stream.end_reason


def run_streams(pipe, n: int, chunks: int, steps: int, ffe: bool, switch_mode: str | None = None) -> dict:
    """N concurrent streams on an N-slot engine; stream 0 switches its prompt mid-way if asked."""
    from asd_deploy.serve.slots import SlotEngine

    cfg = pipe.config
    frames = cfg.pixel_frames_for(chunks * cfg.frames_per_chunk)
    engine = SlotEngine(pipe, n)
    try:
        warm = engine.open(PROMPTS[0], steps=steps, ffe=ffe, seed=99, frames=cfg.pixel_frames_for(cfg.frames_per_chunk))
        list(warm)  # first calls (allocation, text encoder) are not timed
        for p in PROMPTS:
            engine.encode_prompt(p)
        ticks0 = engine.ticks
        t0 = time.perf_counter()
        streams = [engine.open(PROMPTS[i % len(PROMPTS)], steps=steps, ffe=ffe, seed=i, frames=frames,
                               switch_mode=switch_mode or "recache") for i in range(n)]
        outs = [{} for _ in range(n)]
        # the switch comes at least `buffer_chunks` + 1 chunks before the end, so it lands in the stream
        switch_at = max(0, min(chunks // 2, chunks - engine.buffer_chunks - 3))
        threads = [threading.Thread(target=_consume, args=(s, o) + ((switch_at, PROMPTS[-1]) if i == 0 and
                                                                   switch_mode else ()))
                   for i, (s, o) in enumerate(zip(streams, outs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = max(o["rows"][-1]["arrived"] for o in outs) - t0
        ticks = engine.ticks - ticks0
    finally:
        engine.close()
    per_stream = []
    for o in outs:
        rows = o["rows"]
        lat = [r["latency_s"] for r in rows]
        gaps = [b["arrived"] - a["arrived"] for a, b in zip(rows, rows[1:])]
        per_stream.append({"chunks": len(rows), "frames": sum(r["frames"] for r in rows), "end": o["end"],
                           "ttff_s": rows[0]["ready_s"], "chunk_latency_p50_s": _p(lat, 50),
                           "chunk_latency_p99_s": _p(lat, 99), "gap_p99_s": _p(gaps, 99),
                           "gen_s_median": statistics.median(r["gen_s"] for r in rows),
                           "decode_s_median": statistics.median(r["decode_s"] for r in rows),
                           "switch_s": o.get("switch_s")})
    total = sum(s["frames"] for s in per_stream)
    return {"streams": n, "chunks": chunks, "wall_s": wall, "frames": total, "aggregate_fps": total / wall,
            "fps_per_stream": total / wall / n, "ticks": ticks, "ticks_per_s": ticks / wall,
            "chunk_latency_p99_s": max(s["chunk_latency_p99_s"] for s in per_stream),
            "ttff_s_max": max(s["ttff_s"] for s in per_stream), "per_stream": per_stream,
            "switch_mode": switch_mode, "switch_s": per_stream[0]["switch_s"]}


def write_report(res: dict, out: Path):
    lines = [f"# Serving: {res['config']} ({res['backend']}, {res['decoder']} decoder), {res['schedule']}", "",
             f"`{res['command']}`", "",
             f"{res['machine']['cpu']}, {res['machine']['cores']} cores, torch {res['machine']['torch']}; "
             f"in process (slot engine + {res['decoder_impl']} decode + JPEG per consumer thread), no "
             "network.", "",
             "| streams | aggregate FPS | FPS per stream | p99 chunk latency (ms) | p99 gap (ms) | max TTFF (ms) | "
             "step calls/s | switch, re-cache (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        sw = f"{1000 * r['switch_s']:.0f}" if r.get("switch_s") is not None else "-"
        lines.append(f"| {r['streams']} | {r['aggregate_fps']:.1f} | {r['fps_per_stream']:.1f} | "
                     f"{1000 * r['chunk_latency_p99_s']:.1f} | {1000 * max(s['gap_p99_s'] for s in r['per_stream']):.1f}"
                     f" | {1000 * r['ttff_s_max']:.0f} | {r['ticks_per_s']:.0f} | {sw} |")
    cut = res.get("cut")
    if cut and cut.get("switch_s") is not None:
        lines += ["", f"Hard cut instead of re-cache (1 stream): switch latency {1000 * cut['switch_s']:.0f} ms "
                      f"(request to the first decoded chunk under the new prompt)."]
    lines += ["", "Chunk latency: a chunk's first batched step to its decoded frames. Gap: time between two "
                  "consecutive chunks reaching the consumer. Switch: stream 0 asks for a new prompt after taking its "
                  "middle chunk; the latency runs to its first decoded chunk under the new prompt (the chunks "
                  "already buffered for it, at most --buffer-chunks, come first)."]
    (out / "serving.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="default", help="'default' (the embedded model) or a preset (random weights)")
    ap.add_argument("--backend", default="eager", help="eager | compile | ort | aoti (engines at batch N each)")
    ap.add_argument("--streams", default="1,2,4,8", help="stream counts to run")
    ap.add_argument("--chunks", type=int, default=12, help="chunks per stream")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--ffe", action=argparse.BooleanOptionalAction, default=True, help="First-Frame Enhancement")
    ap.add_argument("--decoder", default="vae", choices=("vae", "tiny"),
                    help="each stream's decoder: the model's VAE or its tiny decoder (as `serve --decoder`)")
    ap.add_argument("--out", default=None, help="report folder (default benchmarks/reports/<date>-<host>)")
    args = ap.parse_args(argv)
    counts = [int(s) for s in args.streams.split(",")]
    if args.chunks < 5 or min(counts) < 1:
        ap.error("--chunks must be >= 5 (a prompt switch lands mid-stream) and every stream count >= 1")
    from asd_deploy.schedule import Schedule

    ffe = args.ffe
    res = {"command": "python -m benchmarks.serving " + " ".join(argv if argv is not None else sys.argv[1:]),
           "config": args.config, "backend": args.backend, "decoder": args.decoder,
           "schedule": Schedule(args.steps, ffe).describe(),
           "machine": machine_info(), "runs": []}
    any_batch = args.backend in ("eager", "compile")  # one pipeline serves every N; engines are per batch
    pipe = _pipeline(args, 1) if any_batch else None
    for n in counts:
        print(f"[serving] {n} stream(s) ...", flush=True)
        pipe_n = pipe if any_batch else _pipeline(args, n)
        res["runs"].append(run_streams(pipe_n, n, args.chunks, args.steps, ffe, switch_mode="recache"))
    print("[serving] hard cut, 1 stream ...", flush=True)
    pipe = pipe or _pipeline(args, 1)
    res["cut"] = run_streams(pipe, 1, args.chunks, args.steps, ffe, switch_mode="cut")
    res["config_name"] = pipe.config.name
    res["decoder_impl"] = pipe.info["decoder"]
    out = Path(args.out) if args.out else report_dir()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "serving.json", res)
    write_report(res, out)
    print((out / "serving.md").read_text())
    print(f"written: {out}/serving.json, serving.md")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
