"""Latency report a deployer can trust: every figure from this one command, on this machine.

    python -m benchmarks.latency [--config tiny|small|medium|default] [--backends eager,compile,ort,aoti]
                                 [--steps 1,2,4] [--ffe] [--chunks N] [--repeats R] [--long-chunks 50]

Writes benchmarks/reports/<date>-<host>/latency.json (machine-readable, machine described),
latency.md (the human report) and PNG plots (per-chunk latency by chunk index; FPS by backend
and steps). Per setting: time to first frame, per-chunk latency, steady FPS DiT-only and with
VAE decode, text-encoding time, peak RSS, KV-cache bytes, achieved GFLOP/s against this
machine's fp32 matmul peak measured in the same run (the faster of torch.mm and oneDNN; the
bound the step's own kernels put on that ratio: `benchmarks.ceiling`). Warm-up (compile,
engine load) is reported apart; timings are medians over repeats with min and max. Settings that cannot run here
(TensorRT, CUDA graphs without a GPU) are listed as "not run: no GPU", never with a number.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from asd_deploy.cache import KVCache
from asd_deploy.config import ModelConfig
from asd_deploy.generator import generate
from asd_deploy.model import CausalWanDiT
from asd_deploy.registry import load_dit
from asd_deploy.schedule import Schedule
from benchmarks.common import machine_info, onednn_linear, report_dir, write_json

GPU_ONLY = ("trt", "eager+cudagraph")  # measured on a GPU by python -m benchmarks.gpu


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_rates_gflops(n: int = 1024, repeats: int = 5) -> dict[str, float]:
    """fp32 GEMM throughput of this machine (GFLOP/s, best of `repeats`), n x n x n, by each
    library torch carries: its BLAS (`torch.mm`, MKL on x86) and oneDNN on a prepacked weight
    (what AOTInductor's frozen linears call). They differ a lot on some CPUs: MKL runs its AVX2
    kernels on AMD EPYC, oneDNN its AVX-512 ones. The machine's peak is the faster of the two."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemms = {"torch.mm": lambda: a @ b}
    if torch.backends.mkldnn.is_available():
        gemms["onednn"] = onednn_linear(a, b.t().contiguous())
    rates, ref = {}, a @ b
    for name, gemm in gemms.items():
        err = (gemm() - ref).abs().max().item()
        if err > 1e-3 * ref.abs().max().item():  # a GEMM that is fast because it is wrong sets no peak
            raise RuntimeError(f"{name} GEMM disagrees with torch.mm (max abs error {err:.3g}); no peak measured")
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(4):
                gemm()
            best = min(best, (time.perf_counter() - t0) / 4)
        rates[name] = 2 * n ** 3 / best / 1e9
    return rates


def step_flops(cfg: ModelConfig) -> int:
    """FLOPs of one chunk step against a full cache (counted on the meta device, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad():
        m, c = CausalWanDiT(cfg), KVCache(cfg, device="meta")
        args = (torch.randn(cfg.chunk_shape()), torch.zeros(1, cfg.frames_per_chunk), torch.randn(cfg.cross_shape()),
                torch.randn(cfg.cross_shape()), c.k, c.v, c.frame_index, c.cache_len)
        fc = FlopCounterMode(display=False)
        with fc:
            m.forward_step(*args)
    return fc.get_total_flops()


class CountingStep:
    """A chunk step that counts its calls, so the FLOPs a timing covers are counted, not inferred."""

    def __init__(self, step):
        self.step, self.calls = step, 0
        self.config, self.dtype, self.device = step.config, step.dtype, step.device

    def cross_kv(self, context):
        return self.step.cross_kv(context)

    def __call__(self, *args):
        self.calls += 1
        return self.step(*args)


def run_once(step, vae, context, num_chunks, schedule, seed=0):
    """Per-chunk DiT seconds, VAE seconds and step calls for one video. A chunk's DiT time is
    what `next()` on the generator takes: the previous chunk's clean pass, then this chunk's
    steps; the calls are counted around exactly that."""
    dit, dec, calls = [], [], []
    counted = CountingStep(step)
    decoder = vae.stream_decoder(1)
    it = generate(counted, context, num_chunks=num_chunks, schedule=schedule, seed=seed)
    for _ in range(num_chunks):
        before = counted.calls
        t0 = time.perf_counter()
        lat = next(it)
        if lat.is_cuda:  # queued kernels: wait for them, or the VAE's copy pays for the DiT
            torch.cuda.synchronize(lat.device)
        t1 = time.perf_counter()
        calls.append(counted.calls - before)
        decoder.decode_chunk(lat.float())
        dec.append(time.perf_counter() - t1)
        dit.append(t1 - t0)
    return dit, dec, calls


def summarize(runs, cfg: ModelConfig, text_s: float, schedule: Schedule, flops: int, peak: float) -> dict:
    n = len(runs[0][0])
    med = lambda xs: statistics.median(xs)  # noqa: E731
    dit = [med([r[0][i] for r in runs]) for i in range(n)]
    dec = [med([r[1][i] for r in runs]) for i in range(n)]
    frames = [cfg.pixel_frames_for(cfg.frames_per_chunk)] + [cfg.vae_stride[0] * cfg.frames_per_chunk] * (n - 1)
    steady = slice(1, n) if n > 1 else slice(0, n)
    fps_dit = sum(frames[steady]) / sum(dit[steady])
    fps_vae = sum(frames[steady]) / (sum(dit[steady]) + sum(dec[steady]))
    calls = runs[0][2]  # the same in every run: the schedule fixes them
    gflops = sum(c * flops for c in calls[steady]) / sum(dit[steady]) / 1e9
    totals = [sum(r[0]) for r in runs]
    return {"schedule": schedule.describe(), "steps": schedule.steps, "ffe": schedule.ffe,
            "chunk_dit_s": dit, "chunk_vae_s": dec, "chunk_step_calls": calls, "chunk_frames": frames,
            "video_dit_s": {"median": med(totals), "min": min(totals), "max": max(totals)},
            "time_to_first_frame_s": text_s + dit[0] + dec[0], "text_s": text_s,
            "fps_dit_only": fps_dit, "fps_with_vae": fps_vae, "achieved_gflops": gflops,
            "pct_of_matmul_peak": 100 * gflops / peak}


def bench_backend(name, loaded, vae, context, args, flops, peak):
    from asd_deploy.pipeline import make_step

    t0 = time.perf_counter()
    try:
        # 'ort18' / 'ort23': the ORT engine of that opset under engines/
        opset = int(name[3:]) if name.startswith("ort") and name[3:].isdigit() else None
        step = make_step("ort" if opset else name, loaded, opset=opset)
        run_once(step, vae, context, 1, Schedule(steps=1))  # first call: compile / engine load / warm caches
    except Exception as e:  # an engine not built, a backend not installed: reported, not hidden
        return {"backend": name, "not_run": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    warm = time.perf_counter() - t0
    rows = []
    settings = [Schedule(steps=s) for s in args.steps] + ([Schedule(steps=s, ffe=True) for s in args.steps]
                                                          if args.ffe else [])
    if Schedule(steps=4) not in settings:
        settings.append(Schedule(steps=4))  # the Self-Forcing recipe: 4 steps + the clean pass
    for sched in settings:
        runs = [run_once(step, vae, context, args.chunks, sched, seed=r) for r in range(args.repeats)]
        rows.append(summarize(runs, loaded.config, args.text_s, sched, flops, peak))
    return {"backend": name, "warmup_s": warm, "rows": rows}


def long_video(loaded, vae, context, chunks: int) -> dict:
    """Rolling window: latency and RSS stay flat far past the cache length."""
    from asd_deploy.pipeline import make_step

    step = make_step("eager", loaded)
    lat, rss = [], []
    it = generate(step, context, num_chunks=chunks, schedule=Schedule(steps=1), seed=0)
    for _ in range(chunks):
        t0 = time.perf_counter()
        next(it)
        lat.append(time.perf_counter() - t0)
        rss.append(peak_rss_mb())
    w = lambda i: statistics.median(lat[max(0, i - 2):i + 3])  # noqa: E731  (5-chunk window, less noise)
    return {"chunks": chunks, "chunk_s": lat, "peak_rss_mb": rss, "chunk5_s": w(5), "chunk50_s": w(min(50, chunks - 3)),
            "ratio_50_over_5": w(min(50, chunks - 3)) / w(5), "rss_growth_mb_5_to_end": rss[-1] - rss[5]}


def write_report(res: dict, out) -> None:
    m = res["machine"]
    L = [f"# Latency report ({res['config']})", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
         f"onnxruntime {m['onnxruntime']}, GPU: {m['gpu'] or 'none'}.",
         f"Command: `{res['command']}`", "",
         f"fp32 matmul peak measured in this run: {res['matmul_peak_gflops']:.1f} GFLOP/s (the faster of "
         + ", ".join(f"{k} {v:.1f}" for k, v in res["matmul_rates_gflops"].items()) + ", 1024^3). "
         f"One chunk step (full cache): {res['step_gflop']:.3f} GFLOP. Text encoding: {res['text_s'] * 1e3:.1f} ms. "
         f"KV cache: {res['kv_cache_bytes'] / 2**20:.2f} MiB. Peak RSS: {res['peak_rss_mb']:.0f} MiB.", "",
         "| backend | schedule | first frame (s) | chunk DiT median (ms) | FPS DiT only | FPS with VAE | GFLOP/s | % peak | warm-up (s) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for b in res["backends"]:
        if "not_run" in b:
            L.append(f"| {b['backend']} | - | not run: {b['not_run']} | | | | | | |")
            continue
        for r in b["rows"]:
            L.append(f"| {b['backend']} | {r['schedule']} | {r['time_to_first_frame_s']:.3f} | "
                     f"{1e3 * statistics.median(r['chunk_dit_s'][1:] or r['chunk_dit_s']):.1f} | {r['fps_dit_only']:.1f} | "
                     f"{r['fps_with_vae']:.1f} | {r['achieved_gflops']:.1f} | {r['pct_of_matmul_peak']:.0f}% | "
                     f"{b['warmup_s']:.2f} |")
    for g in GPU_ONLY:
        L.append(f"| {g} | - | not run: no GPU | | | | | | |")
    L += ["", "## ASD 1-step against the Self-Forcing recipe (4 steps + clean pass), DiT only", ""]
    for b in res["backends"]:
        for k, v in b.get("speedup_vs_self_forcing", {}).items():
            L.append(f"- {b['backend']}: {k}: {v:.2f}x faster (goal for 1-step: >= 2.4x)")
    if res.get("vs_diffusers"):
        L += ["", "## Our eager DiT against diffusers' WanTransformer3DModel (same config and weights, one chunk)", "",
              "| row | median (ms) | min | max | speed vs diffusers |", "|---|---|---|---|---|"]
        for k, v in res["vs_diffusers"]["rows"].items():
            L.append(f"| {k} | {1e3 * v['median']:.2f} | {1e3 * v['min']:.2f} | {1e3 * v['max']:.2f} | "
                     f"{v['speedup_vs_diffusers']:.2f}x |")
    if res.get("long"):
        lv = res["long"]
        L += ["", f"## Long video (rolling window, {lv['chunks']} chunks, eager 1-step)", "",
              f"chunk 50 / chunk 5 latency: {lv['ratio_50_over_5']:.2f}x (goal <= 1.1x); RSS growth from chunk 5 to "
              f"the end: {lv['rss_growth_mb_5_to_end']:.1f} MiB."]
    p = res["projection"]
    L += ["", "## Paper-scale projection (NOT a measurement)", "",
          f"At `wan2.1-1.3b` one chunk step against a full cache is {p['step_tflop']:.1f} TFLOP. On one H100 "
          f"(~{p['h100_dense_bf16_tflops']} TFLOP/s dense bf16) at an assumed {p['utilisation'] * 100:.0f}% "
          f"utilisation: 1-step (+ clean pass) {p['fps_1step']:.0f} FPS, Self-Forcing recipe (4 + clean pass) "
          f"{p['fps_4step']:.0f} FPS (DiT only; 12 frames per chunk). The paper reports 17.0 FPS for the latter."]
    (out / "latency.md").write_text("\n".join(L) + "\n")


def plots(res: dict, out) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for b in res["backends"]:
        for r in b.get("rows", []):
            ax.plot([1e3 * x for x in r["chunk_dit_s"]], marker="o", label=f"{b['backend']} {r['schedule']}")
    ax.set_xlabel("chunk index")
    ax.set_ylabel("DiT latency per chunk (ms)")
    ax.set_title(f"per-chunk latency, {res['config']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "chunk_latency.png", dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4))
    labels, vals = [], []
    for b in res["backends"]:
        for r in b.get("rows", []):
            labels.append(f"{b['backend']}\n{r['schedule']}")
            vals.append(r["fps_dit_only"])
    ax.bar(range(len(vals)), vals)
    ax.set_xticks(range(len(vals)), labels, fontsize=6)
    ax.set_ylabel("steady FPS (DiT only)")
    ax.set_title(f"FPS by backend and steps, {res['config']}")
    fig.tight_layout()
    fig.savefig(out / "fps.png", dpi=110)
    plt.close("all")


def main(argv=None):
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", help="tiny | small | medium | default (the embedded model)")
    ap.add_argument("--backends", default="eager")
    ap.add_argument("--steps", default="1,2")
    ap.add_argument("--ffe", action="store_true", help="also run each step count with First-Frame Enhancement")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-chunks", type=int, default=0, help="rolling-window run length (0: skip; 50+ for the goal)")
    ap.add_argument("--out", default=None, help="report folder (default benchmarks/reports/<date>-<host>)")
    args = ap.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    if args.chunks < 2:
        ap.error("--chunks must be >= 2 (steady state excludes the first chunk)")
    from pathlib import Path

    from asd_deploy.text import DefaultTextEncoder
    from asd_deploy.vae import VideoVAE

    loaded = load_dit("default") if args.config == "default" else load_dit("random", args.config)
    cfg = loaded.config
    vae = VideoVAE.tiny(seed=0, z_dim=cfg.in_channels)
    enc = DefaultTextEncoder(text_len=cfg.text_len)
    t0 = time.perf_counter()
    context = enc.encode("a red circle moving right on a white background")
    args.text_s = time.perf_counter() - t0
    rates = matmul_rates_gflops()
    peak = max(rates.values())
    flops = step_flops(cfg)
    res = {"command": "python -m benchmarks.latency " + " ".join(argv if argv is not None else sys.argv[1:]),
           "config": cfg.name, "machine": machine_info(), "matmul_peak_gflops": peak,
           "matmul_rates_gflops": rates, "step_gflop": flops / 1e9,
           "text_s": args.text_s, "kv_cache_bytes": KVCache(cfg).nbytes, "backends": []}
    for name in args.backends.split(","):
        print(f"[latency] {name} ...", flush=True)
        b = bench_backend(name, loaded, vae, context, args, flops, peak)
        rows = {r["schedule"]: r for r in b.get("rows", [])}
        sf = rows.get("4-step")
        if sf:
            b["speedup_vs_self_forcing"] = {k: sf["video_dit_s"]["median"] / r["video_dit_s"]["median"]
                                            for k, r in rows.items() if k != "4-step"}
        res["backends"].append(b)
    if args.config != "default":
        from benchmarks.eager_vs_diffusers import bench_config
        print("[latency] eager vs diffusers ...", flush=True)
        res["vs_diffusers"] = bench_config(cfg.name, max(3, args.repeats))
    res["not_run"] = {g: "not run: no GPU" for g in GPU_ONLY} if not torch.cuda.is_available() else {}
    res["long"] = long_video(loaded, vae, context, args.long_chunks) if args.long_chunks else None
    wan = ModelConfig.preset("wan2.1-1.3b")
    wf = step_flops(wan)
    util, h100 = 0.4, 989
    per_step = wf / (h100 * 1e12 * util)
    frames = wan.vae_stride[0] * wan.frames_per_chunk
    res["projection"] = {"step_tflop": wf / 1e12, "h100_dense_bf16_tflops": h100, "utilisation": util,
                         "fps_1step": frames / (2 * per_step), "fps_4step": frames / (5 * per_step),
                         "label": "projection from FLOP counts, not a measurement"}
    res["peak_rss_mb"] = peak_rss_mb()
    out = Path(args.out) if args.out else report_dir()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "latency.json", res)
    write_report(res, out)  # the reports first: a missing plotting library must not cost the numbers
    print((out / "latency.md").read_text())
    try:
        plots(res, out)
        print(f"written: {out}/latency.json, latency.md, chunk_latency.png, fps.png")
    except ImportError as e:
        print(f"written: {out}/latency.json, latency.md; plots skipped: {e.name or 'matplotlib'} is not installed "
              f"(pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
