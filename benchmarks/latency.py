"""Latency report a deployer can trust: every figure from this one command, on this machine.

    python -m benchmarks.latency [--config tiny|small|medium|default] [--backends eager,compile,ort18,ort23,aoti,auto]
                                 [--decoders vae,tiny] [--steps 1,2,4] [--ffe|--no-ffe] [--chunks N] [--repeats R]
                                 [--long-chunks 1000] [--vae FOLDER] [--tiny-decoder FOLDER]

Writes benchmarks/reports/<date>-<host>/latency.json (machine-readable, machine described),
latency.md (the human report) and PNG plots (per-chunk latency by chunk index; FPS by backend
and steps). Two parts, side by side in one run:
  - DiT only, per backend and schedule: per-chunk latency, steady FPS, achieved GFLOP/s against
    this machine's fp32 matmul peak measured in the same run (the faster of torch.mm and oneDNN;
    the bound the step's own kernels put on that ratio: `benchmarks.ceiling`), 1-step against the
    Self-Forcing recipe.
  - End to end (`e2e.py`), per backend and decoder (the VAE's, the tiny one): frames out of
    `Pipeline.stream` (pipelined), time to first frame (text included), steady end-to-end FPS,
    per-chunk p50/p99 and jitter, the text / DiT / decode split, current RSS per chunk, and a
    long rolling-window stream (`--long-chunks`) for RSS and latency growth.
Issue 15's goal ratios are computed from those rows and printed together. Warm-up (compile,
engine load) is reported apart; timings are medians over repeats. Settings that cannot run here
(TensorRT, CUDA graphs without a GPU) are listed as "not run: no GPU", never with a number; a
decoder without trained weights is timed and labelled "random weights".
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

from asd_deploy.cache import KVCache
from asd_deploy.config import ModelConfig
from asd_deploy.generator import generate
from asd_deploy.model import CausalWanDiT
from asd_deploy.registry import load_dit
from asd_deploy.schedule import Schedule
from benchmarks.common import machine_info, onednn_linear, report_dir, write_json
from benchmarks.e2e import e2e_run, goal_ratios, long_stream, summarize_e2e

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


def step_flop_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all FLOPs, linear-layer FLOPs) of one chunk step against a full cache, counted on the
    meta device (no compute); attention's batched matmuls are in the first only."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad():
        m, c = CausalWanDiT(cfg), KVCache(cfg, device="meta")
        args = (torch.randn(cfg.chunk_shape()), torch.zeros(1, cfg.frames_per_chunk), torch.randn(cfg.cross_shape()),
                torch.randn(cfg.cross_shape()), c.k, c.v, c.frame_index, c.cache_len)
        fc = FlopCounterMode(display=False)
        with fc:
            m.forward_step(*args)
    counts = fc.get_flop_counts().get("Global", {})
    gemm = sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))
    return fc.get_total_flops(), gemm


def step_flops(cfg: ModelConfig) -> int:
    """FLOPs of one chunk step against a full cache."""
    return step_flop_counts(cfg)[0]


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


def run_once(step, context, num_chunks, schedule, seed=0):
    """Per-chunk DiT seconds and step calls for one video (no decode: the end-to-end rows have
    it). A chunk's DiT time is what `next()` on the generator takes: the previous chunk's clean
    pass, then this chunk's steps; the calls are counted around exactly that."""
    dit, calls = [], []
    counted = CountingStep(step)
    it = generate(counted, context, num_chunks=num_chunks, schedule=schedule, seed=seed)
    for _ in range(num_chunks):
        before = counted.calls
        t0 = time.perf_counter()
        lat = next(it)
        if lat.is_cuda:  # queued kernels: wait for them, or the next timing pays for the DiT
            torch.cuda.synchronize(lat.device)
        dit.append(time.perf_counter() - t0)
        calls.append(counted.calls - before)
    return dit, calls


def summarize(runs, cfg: ModelConfig, text_s: float, schedule: Schedule, flops: int, peak: float) -> dict:
    n = len(runs[0][0])
    med = lambda xs: statistics.median(xs)  # noqa: E731
    dit = [med([r[0][i] for r in runs]) for i in range(n)]
    frames = [cfg.pixel_frames_for(cfg.frames_per_chunk)] + [cfg.vae_stride[0] * cfg.frames_per_chunk] * (n - 1)
    steady = slice(1, n) if n > 1 else slice(0, n)
    fps_dit = sum(frames[steady]) / sum(dit[steady])
    calls = runs[0][1]  # the same in every run: the schedule fixes them
    gflops = sum(c * flops for c in calls[steady]) / sum(dit[steady]) / 1e9
    totals = [sum(r[0]) for r in runs]
    return {"schedule": schedule.describe(), "steps": schedule.steps, "ffe": schedule.ffe,
            "chunk_dit_s": dit, "chunk_step_calls": calls, "chunk_frames": frames,
            "video_dit_s": {"median": med(totals), "min": min(totals), "max": max(totals)},
            "time_to_first_frame_dit_s": text_s + dit[0], "text_s": text_s,
            "fps_dit_only": fps_dit, "achieved_gflops": gflops, "pct_of_matmul_peak": 100 * gflops / peak}


def backend_step(name, loaded):
    """'ort18' / 'ort23': the ORT engine of that opset under engines/; 'auto': the engine
    `export.build --backend auto` chose; else a backend name."""
    from asd_deploy.pipeline import make_step

    opset = int(name[3:]) if name.startswith("ort") and name[3:].isdigit() else None
    return make_step("ort" if opset else name, loaded, opset=opset)


def bench_backend(name, loaded, context, args, flops, peak):
    t0 = time.perf_counter()
    try:
        step = backend_step(name, loaded)
        run_once(step, context, 1, Schedule(steps=1))  # first call: compile / engine load / warm caches
    except Exception as e:  # an engine not built, a backend not installed: reported, not hidden
        return {"backend": name, "not_run": f"{type(e).__name__}: {str(e).splitlines()[0]}"}, None
    warm = time.perf_counter() - t0
    rows = []
    settings = [Schedule(steps=s) for s in args.steps] + ([Schedule(steps=s, ffe=True) for s in args.steps]
                                                          if args.ffe else [])
    for must in (Schedule(steps=1), Schedule(steps=4)):  # ASD 1-step; the Self-Forcing recipe (4 + clean pass)
        if must not in settings:
            settings.append(must)
    for sched in settings:
        runs = [run_once(step, context, args.chunks, sched, seed=r) for r in range(args.repeats)]
        rows.append(summarize(runs, loaded.config, args.text_s, sched, flops, peak))
    return {"backend": name, "warmup_s": warm, "rows": rows}, step


E2E_SCHEDULES = (Schedule(steps=1, ffe=True), Schedule(steps=1), Schedule(steps=4))  # deployed; ASD 1; Self-Forcing


def decoders_for(args):
    """{name: (kind, tiny source or None, label)} of the decoders to time end to end."""
    from asd_deploy.decoders.tiny import TINY_DECODER_ARCHS, TinyDecoder
    from asd_deploy.registry import ASSETS

    out = {}
    for d in args.decoders:
        if d == "vae":
            out["vae"] = ("vae", None, "trained" if args.vae or args.config == "default" else "random weights")
        elif d == "tiny":
            folder = args.tiny_decoder or (str(ASSETS / "tiny_decoder") if args.config == "default" else None)
            if args.tiny_decoder and not Path(folder, "config.json").is_file():
                raise FileNotFoundError(f"--tiny-decoder {folder}: no tiny decoder there")
            if folder is not None and Path(folder, "config.json").is_file():
                out["tiny"] = ("tiny", folder, "trained")
            else:  # time the architecture; its frames mean nothing
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    net = TinyDecoder(TINY_DECODER_ARCHS["demo"], source="random weights (speed only)").eval()
                out["tiny"] = ("tiny", net, "random weights")
        elif "=" in d:  # NAME=FOLDER: another tiny decoder, timed beside the others in the same run
            name, folder = d.split("=", 1)
            if not name or name in ("vae", "tiny") or not Path(folder, "config.json").is_file():
                raise ValueError(f"--decoders {d!r}: expected NAME=FOLDER with a new NAME and a tiny decoder folder "
                                 f"(python -m training.tiny_decoder) holding config.json")
            out[name] = ("tiny", folder, f"trained ({folder})")
        else:
            raise ValueError(f"--decoders takes vae, tiny and NAME=TINY_DECODER_FOLDER; got {d!r}")
    return out


def bench_e2e(name, step, loaded, text, vae, decoders, args) -> list[dict]:
    """End-to-end rows of one backend: each decoder x `E2E_SCHEDULES`, pipelined."""
    from asd_deploy.decoders import pipeline_decoder
    from asd_deploy.pipeline import Pipeline

    rows = []
    for dname, (kind, tiny, label) in decoders.items():
        net, note = pipeline_decoder(kind, vae, tiny, step)
        pipe = Pipeline(loaded.config, step, text, vae, decoder=net)
        e2e_run(pipe, 2, steps=1, ffe=False)  # warm the decoder (engine load, first-call allocations)
        for sched in E2E_SCHEDULES:
            runs = [e2e_run(pipe, args.e2e_chunks, sched.steps, sched.ffe, seed=r) for r in range(args.repeats)]
            rows.append({"backend": name, "decoder": dname, "decoder_impl": net.name, "decoder_note": note,
                         "weights": label, "schedule": sched.describe(), "steps": sched.steps, "ffe": sched.ffe,
                         "summary": summarize_e2e(runs)})
            if sched == E2E_SCHEDULES[0]:  # as deployed: also the first frame of a prompt already encoded
                cached = [e2e_run(pipe, 1, sched.steps, sched.ffe, seed=r, fresh_prompt=False)
                          for r in range(args.repeats)]
                rows[-1]["time_to_first_frame_cached_prompt_s"] = statistics.median(c["ready_s"][0] for c in cached)
                rows[-1]["cached_prompt_text_s"] = max(c["text_s"] for c in cached)
    return rows


def _e2e_lines(res: dict) -> list[str]:
    L = ["", "## End to end: frames out of `Pipeline.stream`, decode included (pipelined)", "",
         f"{res['e2e_chunks']} chunks per video; time to first frame includes encoding the prompt (the goal table also "
         "gives it for a prompt already in the pipeline's cache); chunk p50/p99 "
         "and jitter (p99 - p50) are over the intervals between consecutive chunks' frames; DiT and decode overlap "
         "(pipelined), so their shares of the wall time can add up to more than 100%.", "",
         "| backend | decoder | schedule | first frame (s) | FPS end to end | chunk p50 (ms) | p99 (ms) | jitter (ms) "
         "| text / DiT / decode (% of wall) | RSS end (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["e2e"]:
        s, sp = r["summary"], r["summary"]["split_pct_of_wall"]
        dec = f"{r['decoder']} ({r['decoder_impl']}{', ' + r['weights'] if r['weights'] != 'trained' else ''})"
        L.append(f"| {r['backend']} | {dec} | {r['schedule']} | {s['time_to_first_frame_s']:.3f} | "
                 f"{s['fps_end_to_end']:.1f} | {1e3 * s['chunk_p50_s']:.1f} | {1e3 * s['chunk_p99_s']:.1f} | "
                 f"{1e3 * s['jitter_s']:.1f} | {sp['text']:.0f} / {sp['dit']:.0f} / {sp['decode']:.0f} | "
                 f"{s['rss_mb'][-1]:.0f} |")
    g = res["goals"]
    L += ["", "## Issue 15's goals, each from rows of this run", "",
          "| goal | setting | measured | goal | met |", "|---|---|---|---|---|"]
    for k, v in g["e2e_over_dit_only"].items():
        L.append(f"| end-to-end / DiT-only FPS | {k} | {v['e2e_fps']:.1f} / {v['dit_only_fps']:.1f} = "
                 f"{v['ratio']:.2f} | >= {v['goal']} | {'yes' if v['ratio'] >= v['goal'] else 'no'} |")
    for k, v in g["ttff_over_steady_chunk"].items():
        L.append(f"| first frame / steady chunk (FFE{', prompt cached' if k.endswith('cached') else ''}) | "
                 f"{k.removesuffix(' / prompt cached')} | {v['ttff_s']:.3f} / {v['steady_chunk_s']:.3f} = "
                 f"{v['ratio']:.2f} | <= {v['goal']} | {'yes' if v['ratio'] <= v['goal'] else 'no'} |")
    for k, v in g["one_step_over_self_forcing"].items():
        L.append(f"| Self-Forcing recipe / ASD, whole video with decode | {k} | {v['self_forcing_video_s']:.3f} / "
                 f"{v['asd_video_s']:.3f} s = {v['ratio']:.2f} | >= {v['goal']} | "
                 f"{'yes' if v['ratio'] >= v['goal'] else 'no'} |")
    if "long_stream" in g:
        ls, lv = g["long_stream"], res["long"]
        r, t = ls["rss"], ls["chunk_time"]
        L.append(f"| RSS chunk {r['end_chunk']} / chunk {r['ref_chunk']} | {lv['setting']} | "
                 f"{lv['rss_end_mb']:.1f} / {lv['rss_ref_mb']:.1f} MiB = {r['ratio']:.3f} | within 5% | "
                 f"{'yes' if abs(r['ratio'] - 1) <= 0.05 else 'no'} |")
        L.append(f"| chunk {t['end_chunk']} / chunk {t['ref_chunk']} time | {lv['setting']} | "
                 f"{1e3 * lv['time_end_s']:.1f} / {1e3 * lv['time_ref_s']:.1f} ms = {t['ratio']:.2f} | <= 1.1 | "
                 f"{'yes' if t['ratio'] <= 1.1 else 'no'} |")
        if ls["note"]:
            L += ["", f"Note: {ls['note']}."]
    return L


def write_report(res: dict, out) -> None:
    m = res["machine"]
    L = [f"# Latency report ({res['config']})", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
         f"onnxruntime {m['onnxruntime']}, GPU: {m['gpu'] or 'none'}.",
         f"Command: `{res['command']}`", "",
         f"fp32 matmul peak measured in this run: {res['matmul_peak_gflops']:.1f} GFLOP/s (the faster of "
         + ", ".join(f"{k} {v:.1f}" for k, v in res["matmul_rates_gflops"].items()) + ", 1024^3); every % figure "
         f"below is against it. One chunk step (full cache): {res['step_gflop']:.3f} GFLOP. Text encoding: "
         f"{res['text_s'] * 1e3:.1f} ms. KV cache: {res['kv_cache_bytes'] / 2**20:.2f} MiB. Peak RSS: "
         f"{res['peak_rss_mb']:.0f} MiB.", "",
         "## DiT only", "",
         "| backend | schedule | chunk DiT median (ms) | FPS DiT only | GFLOP/s | % peak | warm-up (s) |",
         "|---|---|---|---|---|---|---|"]
    for b in res["backends"]:
        if "not_run" in b:
            L.append(f"| {b['backend']} | - | not run: {b['not_run']} | | | | |")
            continue
        for r in b["rows"]:
            L.append(f"| {b['backend']} | {r['schedule']} | "
                     f"{1e3 * statistics.median(r['chunk_dit_s'][1:] or r['chunk_dit_s']):.1f} | "
                     f"{r['fps_dit_only']:.1f} | "
                     f"{r['achieved_gflops']:.1f} | {r['pct_of_matmul_peak']:.0f}% | {b['warmup_s']:.2f} |")
    for g in GPU_ONLY:
        L.append(f"| {g} | - | not run: no GPU | | | | |")
    L += ["", "ASD 1-step against the Self-Forcing recipe (4 steps + clean pass), DiT only, whole video:", ""]
    for b in res["backends"]:
        for k, v in b.get("speedup_vs_self_forcing", {}).items():
            L.append(f"- {b['backend']}: {k}: {v:.2f}x faster")
    L += _e2e_lines(res)
    if res.get("vs_diffusers"):
        L += ["", "## Our eager DiT against diffusers' WanTransformer3DModel (same config and weights, one chunk)", "",
              "| row | median (ms) | min | max | speed vs diffusers |", "|---|---|---|---|---|"]
        for k, v in res["vs_diffusers"]["rows"].items():
            L.append(f"| {k} | {1e3 * v['median']:.2f} | {1e3 * v['min']:.2f} | {1e3 * v['max']:.2f} | "
                     f"{v['speedup_vs_diffusers']:.2f}x |")
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
            ax.plot([1e3 * x for x in r["chunk_dit_s"]], marker="o", label=f"{b['backend']} {r['schedule']} (DiT)")
    for r in res.get("e2e", []):
        if (r["steps"], r["ffe"]) == (1, True):
            s = r["summary"]
            ax.plot([1e3 * s["ready_s"][0]] + [1e3 * x for x in s["interval_s"]], marker="x", linestyle="--",
                    label=f"{r['backend']} + {r['decoder']} decoder, end to end")
    ax.set_xlabel("chunk index")
    ax.set_ylabel("latency per chunk (ms)")
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
    ap.add_argument("--backends", default="eager", help="eager, compile, ort18, ort23, aoti, auto, trt (comma list)")
    ap.add_argument("--decoders", default="vae,tiny",
                    help="end-to-end decoders (comma list): vae, tiny, and NAME=FOLDER for other tiny decoders "
                         "timed beside them (an engine runs its own decoders; others run eagerly)")
    ap.add_argument("--steps", default="1,2")
    ap.add_argument("--ffe", action=argparse.BooleanOptionalAction, default=True,
                    help="First-Frame Enhancement: DiT-only rows of each step count with FFE, beside the plain "
                         "rows they are compared with (--no-ffe: plain rows only); end-to-end rows always "
                         "include the deployed 1 step + FFE")
    ap.add_argument("--chunks", type=int, default=4, help="chunks per video, DiT-only rows")
    ap.add_argument("--e2e-chunks", type=int, default=None, help="chunks per video, end-to-end rows (default --chunks)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-chunks", type=int, default=0,
                    help="rolling-window stream length for RSS and latency growth (0: skip; the goal is 1000)")
    ap.add_argument("--vae", default=None, help="VAE folder (default: the model's, or a tiny random one)")
    ap.add_argument("--tiny-decoder", default=None,
                    help="tiny decoder folder (default: the model's, or random weights)")
    ap.add_argument("--out", default=None, help="report folder (default benchmarks/reports/<date>-<host>)")
    args = ap.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    args.decoders = [d for d in args.decoders.split(",") if d]
    args.e2e_chunks = args.e2e_chunks or args.chunks
    if args.chunks < 2 or args.e2e_chunks < 2:
        ap.error("--chunks and --e2e-chunks must be >= 2 (steady state excludes the first chunk)")
    from asd_deploy.registry import ASSETS, default_is_trained
    from asd_deploy.text import load_text_encoder
    from asd_deploy.vae import VideoVAE

    loaded = load_dit("default") if args.config == "default" else load_dit("random", args.config)
    cfg = loaded.config
    vae_dir = args.vae or (ASSETS / "vae" if args.config == "default" and default_is_trained() else None)
    vae = VideoVAE.from_pretrained(vae_dir) if vae_dir else VideoVAE.tiny(seed=0, z_dim=cfg.in_channels)
    decoders = decoders_for(args)
    enc = load_text_encoder("default", cfg.text_len)   # what generate uses for the small configs
    t0 = time.perf_counter()
    context = enc.encode("a red circle moving right on a white background")
    args.text_s = time.perf_counter() - t0
    rates = matmul_rates_gflops()
    peak = max(rates.values())
    flops = step_flops(cfg)
    res = {"command": "python -m benchmarks.latency " + " ".join(argv if argv is not None else sys.argv[1:]),
           "config": cfg.name, "machine": machine_info(), "matmul_peak_gflops": peak,
           "matmul_rates_gflops": rates, "step_gflop": flops / 1e9, "e2e_chunks": args.e2e_chunks,
           "text_s": args.text_s, "kv_cache_bytes": KVCache(cfg).nbytes, "backends": [], "e2e": []}
    first_step = None
    for name in args.backends.split(","):
        print(f"[latency] {name} ...", flush=True)
        b, step = bench_backend(name, loaded, context, args, flops, peak)
        rows = {(r["steps"], r["ffe"]): r for r in b.get("rows", [])}
        sf = rows.get((4, False))
        if sf:
            b["speedup_vs_self_forcing"] = {r["schedule"]: sf["video_dit_s"]["median"] / r["video_dit_s"]["median"]
                                            for k, r in rows.items() if k != (4, False)}
        res["backends"].append(b)
        if step is None:
            continue
        first_step = first_step or (name, step)
        print(f"[latency] {name} end to end ({', '.join(decoders)}) ...", flush=True)
        e2e = bench_e2e(name, step, loaded, enc, vae, decoders, args)
        for r in e2e:  # DiT-only FPS of the same backend and step count, from this run's DiT rows
            r["dit_only_fps"] = rows[(r["steps"], False)]["fps_dit_only"] if (r["steps"], False) in rows else \
                rows[(r["steps"], True)]["fps_dit_only"]
        res["e2e"] += e2e
    if args.config != "default":
        from benchmarks.eager_vs_diffusers import bench_config
        print("[latency] eager vs diffusers ...", flush=True)
        res["vs_diffusers"] = bench_config(cfg.name, max(3, args.repeats))
    res["not_run"] = {g: "not run: no GPU" for g in GPU_ONLY} if not torch.cuda.is_available() else {}
    res["long"] = None
    if args.long_chunks and first_step is not None:
        from asd_deploy.decoders import pipeline_decoder
        from asd_deploy.pipeline import Pipeline

        dname = "tiny" if "tiny" in decoders else "vae"
        kind, tiny, _ = decoders.get(dname, ("vae", None, ""))
        net, _ = pipeline_decoder(kind, vae, tiny, first_step[1])
        print(f"[latency] {args.long_chunks}-chunk stream ({first_step[0]} + {dname} decoder) ...", flush=True)
        res["long"] = long_stream(Pipeline(cfg, first_step[1], enc, vae, decoder=net), args.long_chunks)
        res["long"]["setting"] = f"{first_step[0]} + {dname} decoder, 1-step + FFE"
    res["goals"] = goal_ratios(res["e2e"], res["long"])
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
