"""GPU checks and benchmark: a Wan-1.3B-shaped bf16 chunk step, the VAE decode, projected 480p FPS.

    PYTHONPATH=. python3 -m benchmarks.gpu [--check] [--config wan2.1-1.3b] [--iters 20]
                                           [--skip compile,aoti] [--out DIR]

`--check` first runs every `gpu`-marked test (tests/test_gpu.py, tests/test_tensorrt.py) in a
subprocess and records the result. Then, with random weights (seeded) at `--config`, bf16, batch
1, the cache full (the steady state of a rolling window), it times one chunk step with CUDA
events (median of `--iters`, warm-up apart) for each way of running it:
  eager-cat      `forward_step` (the exported form: the cache concatenated per layer)
  eager          `forward_step_live` (attention over the cache in place; the CUDA default)
  graph          eager in a CUDA graph (`GraphedStep`, one replay per step call)
  compile        `CompiledStep` (torch.compile, fullgraph; Triton kernels as operators)
  compile+graph  the compiled step in a CUDA graph
  aoti           an AOTInductor CUDA package of the step
and reports ms per step, achieved TFLOP/s (FLOPs counted on the meta device), % of this GPU's
bf16 matmul peak measured in the same run, the linears' share of it (GEMM kernels picked out of
a profile by name: a heuristic, said so in the report) and peak memory. It also times the Wan
VAE (random weights, diffusers' default config = Wan2.1's) decoding one streamed chunk, and
projects 480p FPS for 1 step + FFE (steady state: one step and the previous chunk's clean pass
per 12-frame chunk, plus the decode). Writes benchmarks/reports/<date>-<gpu>/gpu.json and
gpu.md. Refuses, saying why, on a machine without a CUDA GPU.

NOT RUN HERE: written on a CPU-only machine; no figure in this project comes from it yet.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import REPORTS, machine_info, write_json

MODES = ("eager-cat", "eager", "graph", "compile", "compile+graph", "aoti")
GEMM_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|s16816|s1688", re.I)
ROOT = Path(__file__).resolve().parent.parent


def run_checks() -> dict:
    """Every gpu-marked test, in a fresh process (so no test module's environment leaks in)."""
    # warnings our own code raises are errors (a fallback that warns is a failed check); others'
    # deprecation notes on the GPU image stay warnings
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs",
           "-W", "error:::asd_deploy.*", "tests/test_gpu.py", "tests/test_tensorrt.py"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-40:]
    print("\n".join(tail), flush=True)
    return {"command": " ".join(cmd), "returncode": proc.returncode, "tail": tail}


def cuda_time_ms(fn, iters: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": iters}


def bf16_matmul_peak_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = cuda_time_ms(lambda: a @ b, iters=20)["min_ms"]
    return 2 * n ** 3 / (t * 1e-3) / 1e12


def step_flops_split(cfg) -> tuple[int, int]:
    """(all FLOPs, linear-layer FLOPs) of one step against a full cache, counted on the meta device."""
    from benchmarks.latency import step_flop_counts

    return step_flop_counts(cfg)


def gemm_ms(fn) -> float | None:
    """Device time of one call spent in kernels named like GEMMs (heuristic), from a profile."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    us = sum(e.device_time_total for e in prof.key_averages() if GEMM_KERNEL.search(e.key)
             and not re.search(r"flash|fmha|attention", e.key, re.I))
    return us / 1e3 if us else None


def build_steps(model, cfg, skip: set, log):
    """{mode: (step callable on the full-cache inputs, inputs)}; each built only when asked."""
    from asd_deploy.backends.compiled import CompiledStep
    from asd_deploy.backends.graphs import GraphedStep
    from asd_deploy.cache import KVCache
    from asd_deploy.generator import EagerStep

    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(cfg.chunk_shape(), device=dev, generator=g).to(dt)
    t = torch.full((1, cfg.frames_per_chunk), 500.0, device=dev, dtype=dt)
    with torch.no_grad():
        ck, cv = model.cross_kv(torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, generator=g).to(dt))

    def cache(live):
        c = KVCache(cfg, 1, dt, dev, work_chunk=live)
        c.k.normal_(generator=g)
        c.v.normal_(generator=g)
        c.cache_len.fill_(cfg.cache_tokens)        # a full window: the steady state
        c.frame_index.fill_(cfg.max_cache_frames)
        return (x, t, ck, cv, c.k, c.v, c.frame_index, c.cache_len)
    plain, live = cache(False), cache(True)
    steps = {"eager-cat": (EagerStep(model, live_cache=False), plain), "eager": (EagerStep(model), live)}
    if "graph" not in skip:
        steps["graph"] = (GraphedStep(EagerStep(model), whole_chunk=False), live)
    if "compile" not in skip:
        log("compiling the step (torch.compile) ...")
        compiled = CompiledStep(model)
        steps["compile"] = (compiled, plain)
        if "graph" not in skip:
            steps["compile+graph"] = (GraphedStep(compiled, whole_chunk=False), plain)
    if "aoti" not in skip:
        import tempfile

        from torch._inductor import aoti_load_package

        from asd_deploy import kernels
        from export.aoti_export import export_aoti
        from export.spec import ExportSpec, StepGraph
        from asd_deploy.backends.signature import step_signature

        log("compiling the step (AOTInductor, CUDA) ...")
        kernels.prepare(dev)
        spec = ExportSpec("step", StepGraph(model).eval(), step_signature(cfg, 1, dt), plain)
        pkg = export_aoti(spec, Path(tempfile.mkdtemp()) / "step.pt2")[0]
        runner = aoti_load_package(str(pkg))
        steps["aoti"] = (lambda *a: runner(*a), plain)
    return steps


def vae_chunk_ms(cfg, iters: int) -> dict:
    """One streamed chunk decoded by the Wan2.1 VAE architecture (random weights), bf16, steady state."""
    from diffusers import AutoencoderKLWan

    from asd_deploy.vae import VideoVAE

    with torch.device("cuda"):
        vae = VideoVAE(AutoencoderKLWan().to(torch.bfloat16), source="wan2.1 architecture, random weights")
    lat = torch.randn(1, cfg.in_channels, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width,
                      device="cuda", dtype=torch.bfloat16)
    dec = vae.stream_decoder(1)
    with torch.no_grad():
        dec.decode_chunk(lat)  # chunk 0 (9 frames) and the decoder's cache warm-up
        return cuda_time_ms(lambda: dec.decode_chunk(lat), iters=iters, warmup=1)


def markdown(rep: dict) -> str:
    L = [f"# GPU benchmark: {rep['gpu']} ({rep['date']})", "",
         f"`{rep['command']}`; torch {rep['torch']} (CUDA {rep['cuda']}), triton {rep.get('triton')}; "
         f"config {rep['config']}, bf16, batch 1, random weights, cache full ({rep['cache_tokens']} tokens).", "",
         f"bf16 matmul peak measured here: **{rep['peak_tflops']:.0f} TFLOP/s** (8192^3 torch.mm). One step: "
         f"{rep['step_tflop']:.2f} TFLOP ({rep['gemm_share']:.0%} of it in the linears).", "",
         "| mode | ms / step | TFLOP/s | % of peak | linears' % of peak | peak memory (GiB) |",
         "|---|---|---|---|---|---|"]
    for name, r in rep["modes"].items():
        if "error" in r:
            L.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        lin = f"{r['linears_pct_of_peak']:.0f}%" if r.get("linears_pct_of_peak") is not None else "-"
        L.append(f"| {name} | {r['median_ms']:.2f} | {r['tflops']:.0f} | {r['pct_of_peak']:.0f}% | {lin} | "
                 f"{r['peak_mem_gib']:.1f} |")
    L += ["", "Linears' % of peak: matmul FLOPs over the device time of kernels named like GEMMs in a profile "
              "of one step (a heuristic on kernel names).", ""]
    if rep.get("vae"):
        L.append(f"VAE decode (Wan2.1 architecture, random weights, bf16), one streamed chunk: "
                 f"{rep['vae']['median_ms']:.1f} ms.")
    p = rep.get("projection")
    if p:
        L += ["", f"## Projected 480p FPS, 1 step + FFE (steady state, {p['frames_per_chunk']} frames per chunk)", "",
              f"- best step: {p['best_mode']} at {p['step_ms']:.2f} ms; DiT per chunk (step + clean pass) "
              f"{2 * p['step_ms']:.1f} ms -> **{p['fps_dit_only']:.1f} FPS DiT only**",
              f"- with the VAE decode after it (no overlap): **{p['fps_with_vae']:.1f} FPS** (goal: 30)",
              f"- graph vs eager: {p['graph_speedup']}"]
    if rep.get("checks"):
        L += ["", f"## Checks (`{rep['checks']['command']}`): exit {rep['checks']['returncode']}", "", "```",
              *rep["checks"]["tail"][-15:], "```"]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="run the gpu-marked tests first")
    ap.add_argument("--config", default="wan2.1-1.3b")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip", default="", help=f"comma-separated modes to skip, of {', '.join(MODES[2:])}, or vae")
    ap.add_argument("--out", default=None, help="report folder (default benchmarks/reports/<date>-<gpu>)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks.gpu needs a CUDA GPU and none is visible (torch.cuda.is_available() is False). "
              "On a CPU machine use python -m benchmarks.latency.", file=sys.stderr)
        return 2
    from asd_deploy.config import ModelConfig
    from asd_deploy.model import build_model

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    gpu = torch.cuda.get_device_name()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    rep = {"date": datetime.date.today().isoformat(), "gpu": gpu, "capability": list(torch.cuda.get_device_capability()),
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
           "command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine_info(), "kernels": os.environ.get("ASD_KERNELS", "auto")}
    if args.check:
        rep["checks"] = run_checks()
    cfg = ModelConfig.preset(args.config)
    rep.update(config=cfg.name, cache_tokens=cfg.cache_tokens)
    rep["peak_tflops"] = bf16_matmul_peak_tflops()
    flops, gemm = step_flops_split(cfg)
    rep.update(step_tflop=flops / 1e12, gemm_share=gemm / flops)
    log(f"{gpu}: bf16 peak {rep['peak_tflops']:.0f} TFLOP/s; step {flops / 1e12:.2f} TFLOP")
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    rep["modes"] = {}
    for name, (step, inputs) in build_steps(model, cfg, skip, log).items():
        torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                r = cuda_time_ms(lambda: step(*inputs), args.iters)
                g = gemm_ms(lambda: step(*inputs)) if name in ("eager", "compile") else None
        except Exception as e:  # one mode failing must not hide the others' figures
            rep["modes"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
            log(f"{name}: FAILED {rep['modes'][name]['error']}")
            continue
        r.update(tflops=flops / (r["median_ms"] * 1e-3) / 1e12, peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
        r["pct_of_peak"] = 100 * r["tflops"] / rep["peak_tflops"]
        r["linears_pct_of_peak"] = (100 * gemm / (g * 1e-3) / 1e12 / rep["peak_tflops"]) if g else None
        rep["modes"][name] = r
        log(f"{name}: {r['median_ms']:.2f} ms/step, {r['tflops']:.0f} TFLOP/s ({r['pct_of_peak']:.0f}% of peak)")
    if "vae" not in skip:
        try:
            rep["vae"] = vae_chunk_ms(cfg, max(3, args.iters // 4))
        except ImportError as e:  # a bare image without diffusers
            log(f"VAE decode not timed: {e}")
    ok = {k: v for k, v in rep["modes"].items() if "median_ms" in v}
    if ok:
        best = min(ok, key=lambda k: ok[k]["median_ms"])
        fpc = cfg.vae_stride[0] * cfg.frames_per_chunk
        dit = 2 * ok[best]["median_ms"]
        vae = rep["vae"]["median_ms"] if rep.get("vae") else 0.0
        speed = (f"{ok['eager']['median_ms'] / ok['graph']['median_ms']:.2f}x (goal 1.2x)"
                 if "graph" in ok and "eager" in ok else "not measured")
        rep["projection"] = {"best_mode": best, "step_ms": ok[best]["median_ms"], "frames_per_chunk": fpc,
                             "fps_dit_only": fpc / (dit * 1e-3), "fps_with_vae": fpc / ((dit + vae) * 1e-3),
                             "graph_speedup": speed}
    out = Path(args.out) if args.out else REPORTS / f"{rep['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu.json", rep)
    tmp = out / "gpu.md.tmp"
    tmp.write_text(markdown(rep))
    os.replace(tmp, out / "gpu.md")
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 1 if rep.get("checks", {}).get("returncode") else 0


if __name__ == "__main__":
    sys.exit(main())
