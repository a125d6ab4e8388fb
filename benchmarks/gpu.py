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
a profile by name: a heuristic, said so in the report) and peak memory. It also times one
streamed chunk's decode by the Wan VAE (random weights, diffusers' default config = Wan2.1's;
with cuDNN's autotuner off and on) and by the tiny decoder's wan2.1 architecture, and gives 480p
FPS for 1 step + FFE (steady state: one step and the previous chunk's clean pass per 12-frame
chunk) DiT only, with each decoder after the DiT, and pipelined: the next chunk's DiT on a second
stream while this one decodes, measured together (`--no-overlap` skips it). Writes
benchmarks/reports/<date>-<gpu>/gpu.json and gpu.md after every stage (a run cut short keeps what
it measured), and with `--check` the tests' whole output in checks.log there. Refuses, saying why, on a machine without a CUDA GPU.

Run on one NVIDIA H200 (benchmarks/reports/2026-12-04-NVIDIA-H200); CI has no GPU.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from benchmarks.common import REPORTS, machine_info, write_json

MODES = ("eager-cat", "eager", "graph", "compile", "compile+graph", "aoti")
GEMM_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|s16816|s1688", re.I)
ROOT = Path(__file__).resolve().parent.parent


def run_checks(log_path: Path, timeout_s: float | None = None, workers: int = 0) -> dict:
    """Every gpu-marked test, in a fresh process (so no test module's environment leaks in). Its
    whole output streams to `log_path` (a run cut short keeps what it printed); the report keeps
    the last 40 lines. `workers` > 0 spreads the tests over that many processes (pytest-xdist,
    where installed: the compiles are CPU-bound)."""
    # warnings our own code raises are errors (a fallback that warns is a failed check); others'
    # deprecation notes on the GPU image stay warnings
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs", "--durations=15",
           "-W", "error:::asd_deploy.*", "tests/test_gpu.py", "tests/test_tensorrt.py"]
    if workers > 0 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(log_path, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    tail = log_path.read_text().strip().splitlines()[-40:]
    if rc is None:
        tail.append(f"(stopped after {timeout_s:.0f} s: --check-timeout)")
    print("\n".join(tail), flush=True)
    return {"command": " ".join(cmd), "returncode": rc, "tail": tail}


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
    """Yields (mode, build) in MODES order, for the modes not skipped; `build()` returns (step
    callable, its full-cache inputs). Built one at a time, so a mode that fails to build, or a
    run cut short in a slow compile, still leaves the modes before it measured."""
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
    compiled = {}

    def compile_step():
        if "step" not in compiled:
            log("compiling the step (torch.compile) ...")
            compiled["step"] = CompiledStep(model)
        return compiled["step"]

    def aoti():
        import tempfile

        from torch._inductor import aoti_load_package

        from asd_deploy import kernels
        from asd_deploy.backends.signature import step_signature
        from export.aoti_export import export_aoti
        from export.spec import ExportSpec, StepGraph

        log("compiling the step (AOTInductor, CUDA) ...")
        kernels.prepare(dev)
        spec = ExportSpec("step", StepGraph(model).eval(), step_signature(cfg, 1, dt), plain)
        pkg = export_aoti(spec, Path(tempfile.mkdtemp()) / "step.pt2")[0]
        runner = aoti_load_package(str(pkg))
        return (lambda *a: runner(*a)), plain

    builders = {"eager-cat": lambda: (EagerStep(model, live_cache=False), plain),
                "eager": lambda: (EagerStep(model), live),
                "graph": lambda: (GraphedStep(EagerStep(model), whole_chunk=False), live),
                "compile": lambda: (compile_step(), plain),
                "compile+graph": lambda: (GraphedStep(compile_step(), whole_chunk=False), plain),
                "aoti": aoti}
    for name in MODES:
        if name in skip or (name == "compile+graph" and ("compile" in skip or "graph" in skip)):
            continue
        yield name, builders[name]


def decoders(cfg) -> dict:
    """{name: a fresh stream's decode_chunk}: the Wan2.1 VAE architecture (random weights, bf16),
    as shipped and with cuDNN's autotuner on, and the tiny decoder's wan2.1 arch (random weights)."""
    from diffusers import AutoencoderKLWan

    from asd_deploy.decoders.tiny import TINY_DECODER_ARCHS, TinyDecoder
    from asd_deploy.vae import VideoVAE

    with torch.device("cuda"):
        vae = VideoVAE(AutoencoderKLWan().to(torch.bfloat16), source="wan2.1 architecture, random weights")
        tiny = TinyDecoder(TINY_DECODER_ARCHS["wan2.1"]).to(torch.bfloat16).eval()
    return {"vae": lambda: vae.stream_decoder(1).decode_chunk,
            "vae+cudnn-benchmark": lambda: vae.stream_decoder(1).decode_chunk,
            "tiny (wan2.1 arch)": lambda: tiny.stream(1).decode_chunk}


def decode_chunk_ms(cfg, make, iters: int, cudnn_benchmark: bool = False) -> dict:
    """One streamed chunk decoded, steady state (chunk 0, 9 frames, and the cache warm-up apart)."""
    lat = torch.randn(1, cfg.in_channels, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width,
                      device="cuda", dtype=torch.bfloat16)
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        decode = make()
        with torch.no_grad():
            decode(lat)
            return cuda_time_ms(lambda: decode(lat), iters=iters, warmup=1)
    finally:
        torch.backends.cudnn.benchmark = before


def overlap_ms(dit_chunk, decode, cfg, iters: int) -> dict:
    """The pipelined steady state, measured: chunk n+1's DiT (step + clean pass) on one stream while
    chunk n is decoded on another; ms per chunk over `iters` chunks."""
    lat = torch.randn(1, cfg.in_channels, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width,
                      device="cuda", dtype=torch.bfloat16)
    s_dit, s_dec = torch.cuda.Stream(), torch.cuda.Stream()
    for s in (s_dit, s_dec):
        s.wait_stream(torch.cuda.current_stream())

    def one():
        with torch.cuda.stream(s_dit):
            dit_chunk()
        with torch.cuda.stream(s_dec):
            decode(lat)
    with torch.no_grad():
        one()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            one()
            torch.cuda.current_stream().wait_stream(s_dit)  # the next chunk starts when both are done
            torch.cuda.current_stream().wait_stream(s_dec)
            s_dit.wait_stream(torch.cuda.current_stream())
            s_dec.wait_stream(torch.cuda.current_stream())
        end.record()
        end.synchronize()
    return {"ms_per_chunk": start.elapsed_time(end) / iters, "iters": iters}


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
    if rep.get("vae_error"):
        L.append(f"Decoders not timed: {rep['vae_error']}")
    p = rep.get("projection")
    if p:
        speed = f"{p['graph_speedup']:.2f}x" if p.get("graph_speedup") else "not measured"
        L += [f"## Projected 480p FPS, 1 step + FFE (steady state, {p['frames_per_chunk']} frames per chunk)", "",
              f"Best step: {p['best_mode']} at {p['step_ms']:.2f} ms; DiT per chunk (step + the previous chunk's "
              f"clean pass) {2 * p['step_ms']:.1f} ms: **{p['fps_dit_only']:.1f} FPS DiT only**. CUDA graph vs "
              f"eager: {speed} (goal 1.2x).", "",
              "Decoders: random weights, bf16, one streamed chunk. Sequential: decode after the DiT; pipelined: "
              "the next chunk's DiT on a second stream while this one decodes (measured together; goal: 30 FPS).", "",
              "| decoder | decode ms / chunk | FPS sequential | ms / chunk pipelined | FPS pipelined |",
              "|---|---|---|---|---|"]
        for name, r in p.get("rows", {}).items():
            pipe = (f"{r['pipelined_ms_per_chunk']:.1f} | **{r['fps_pipelined']:.1f}**" if "fps_pipelined" in r
                    else f"failed: {r['pipelined_error']} |" if "pipelined_error" in r else "- | -")
            L.append(f"| {name} | {r['decode_ms']:.1f} | {r['fps_sequential']:.1f} | {pipe} |")
        L.append("")
    if rep.get("checks"):
        rc = rep["checks"]["returncode"]
        L += ["", f"## Checks (`{rep['checks']['command']}`): " + ("stopped at its time limit" if rc is None else f"exit {rc}"),
              "", "```",
              *rep["checks"]["tail"][-15:], "```"]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="run the gpu-marked tests first")
    ap.add_argument("--config", default="wan2.1-1.3b")
    ap.add_argument("--check-timeout", type=float, default=None, help="seconds the checks may take (default: no limit)")
    ap.add_argument("--check-workers", type=int, default=0, help="processes for the checks (needs pytest-xdist)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip", default="", help=f"comma-separated modes to skip, of {', '.join(MODES[2:])}, or vae (every decoder)")
    ap.add_argument("--no-overlap", dest="overlap", action="store_false",
                    help="skip the measured pipelined (DiT and decode on two streams) figures")
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
    out = Path(args.out) if args.out else REPORTS / f"{rep['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}"
    out.mkdir(parents=True, exist_ok=True)

    def save():  # after every stage: a run cut short still leaves what it measured
        write_json(out / "gpu.json", rep)
        tmp = out / "gpu.md.tmp"
        tmp.write_text(markdown(rep))
        os.replace(tmp, out / "gpu.md")

    if args.check:
        rep["checks"] = run_checks(out / "checks.log", args.check_timeout, args.check_workers)
        write_json(out / "gpu.json", rep)
    cfg = ModelConfig.preset(args.config)
    rep.update(config=cfg.name, cache_tokens=cfg.cache_tokens)
    rep["peak_tflops"] = bf16_matmul_peak_tflops()
    flops, gemm = step_flops_split(cfg)
    rep.update(step_tflop=flops / 1e12, gemm_share=gemm / flops)
    log(f"{gpu}: bf16 peak {rep['peak_tflops']:.0f} TFLOP/s; step {flops / 1e12:.2f} TFLOP")
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    rep["modes"] = {}
    for name, build in build_steps(model, cfg, skip, log):
        torch.cuda.reset_peak_memory_stats()
        try:
            step, inputs = build()
            with torch.no_grad():
                r = cuda_time_ms(lambda: step(*inputs), args.iters)
                g = gemm_ms(lambda: step(*inputs)) if name in ("eager", "compile") else None
        except Exception as e:  # one mode failing must not hide the others' figures
            traceback.print_exc()
            rep["modes"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
            log(f"{name}: FAILED {rep['modes'][name]['error']}")
            save()
            continue
        r.update(tflops=flops / (r["median_ms"] * 1e-3) / 1e12, peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
        r["pct_of_peak"] = 100 * r["tflops"] / rep["peak_tflops"]
        r["linears_pct_of_peak"] = (100 * gemm / (g * 1e-3) / 1e12 / rep["peak_tflops"]) if g else None
        rep["modes"][name] = r
        save()
        log(f"{name}: {r['median_ms']:.2f} ms/step, {r['tflops']:.0f} TFLOP/s ({r['pct_of_peak']:.0f}% of peak)")
    rep["decoders"] = {}
    if "vae" not in skip:
        try:
            for name, make in decoders(cfg).items():
                rep["decoders"][name] = decode_chunk_ms(cfg, make, max(3, args.iters // 2),
                                                        cudnn_benchmark=name.endswith("cudnn-benchmark"))
                log(f"decode {name}: {rep['decoders'][name]['median_ms']:.1f} ms/chunk")
                save()
        except Exception as e:  # a bare image without diffusers, or a failure: said, not hidden
            traceback.print_exc()
            rep["vae_error"] = f"{type(e).__name__}: {e}"[:300]
            log(f"decode not timed: {rep['vae_error']}")
    ok = {k: v for k, v in rep["modes"].items() if "median_ms" in v}
    if ok:
        best = min(ok, key=lambda k: ok[k]["median_ms"])
        fpc = cfg.vae_stride[0] * cfg.frames_per_chunk
        dit = 2 * ok[best]["median_ms"]
        rep["projection"] = {"best_mode": best, "step_ms": ok[best]["median_ms"], "frames_per_chunk": fpc,
                             "fps_dit_only": fpc / (dit * 1e-3), "rows": {},
                             "graph_speedup": ok["eager"]["median_ms"] / ok["graph"]["median_ms"]
                             if "graph" in ok and "eager" in ok else None}
        for name, d in rep["decoders"].items():
            rep["projection"]["rows"][name] = {"decode_ms": d["median_ms"],
                                               "fps_sequential": fpc / ((dit + d["median_ms"]) * 1e-3)}
        # the pipelined figure is measured, not max(dit, decode): both share the GPU
        if args.overlap and rep["decoders"] and best in ("eager", "graph"):
            step, inputs = next(b for n, b in build_steps(model, cfg, skip, log) if n == best)()
            made = decoders(cfg)
            for name, row in rep["projection"]["rows"].items():
                try:
                    before = torch.backends.cudnn.benchmark
                    torch.backends.cudnn.benchmark = name.endswith("cudnn-benchmark")
                    r = overlap_ms(lambda: (step(*inputs), step(*inputs)), made[name](), cfg, max(3, args.iters // 2))
                    torch.backends.cudnn.benchmark = before
                    row.update(pipelined_ms_per_chunk=r["ms_per_chunk"], fps_pipelined=fpc / (r["ms_per_chunk"] * 1e-3))
                    log(f"pipelined {best} + {name}: {r['ms_per_chunk']:.1f} ms/chunk")
                except Exception as e:
                    traceback.print_exc()
                    row["pipelined_error"] = f"{type(e).__name__}: {e}"[:200]
                save()
    save()
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 1 if rep.get("checks", {}).get("returncode", 0) != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
