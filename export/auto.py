"""`python -m export.build --backend auto`: build every candidate engine, time them here, keep
the fastest.

Owns: the candidate list (`CANDIDATES`: ONNX Runtime at opset 18 and 23, AOTInductor frozen
and not), `cpu_features` (what the CPU offers that decides between them: AVX2, AVX-512, VNNI,
BF16, AMX ...), `time_candidates` (each engine's chunk step and decoder step timed round-robin,
so drift hits all alike; every decoder the engines carry; and `time_pipelined`: a steady chunk
as `Pipeline.stream` runs it, DiT and decode overlapped on the shared cores), `choose` (the
fastest steady chunk, pipelined where that was timed, else the sum of steps + clean pass + decode,
decoded by the primary decoder, the first of `--decoder`; the fastest with each other decoder is
recorded as `best_by_decoder`) and
`build_auto`, which writes the winner as its own engine folder (`<config>-s1f4-auto-fp32-<weights>`) whose
manifest is the winner's plus an `auto` section: every candidate's timing or failure, the
choice, the CPU. The losers' folders are deleted. `generate --backend auto` loads it
(`asd_deploy/backends/auto.py`). Does not own the builds themselves (`build.py`).

Why: engine speed depends on the CPU (the README's table: on an AVX-512 EPYC the frozen
AOTInductor engine is fastest; on an AVX2-only machine ONNX Runtime opset 23 was), so the
choice is measured where the engine will run, as TensorRT picks tactics on its target.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

CANDIDATES = (
    {"name": "ort-op18", "backend": "ort", "opset": 18},
    {"name": "ort-op23", "backend": "ort", "opset": 23},
    {"name": "aoti-frozen", "backend": "aoti", "inductor_configs": {"freezing": True}},
    {"name": "aoti", "backend": "aoti", "inductor_configs": {"freezing": False}},
)
_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni",  # x86
             "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm")  # arm


def cpu_features() -> dict:
    """The CPU's model, core count, torch's vector ISA and the SIMD flags that matter here."""
    from asd_deploy.backends.manifest import cpu_isa, host_info

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"model": host_info()["cpu"], "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_cpu_isa": cpu_isa(), "flags": sorted(f for f in _FEATURES if f in flags)}


def _round_robin(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class _FixedContext:
    """A text encoder stand-in for timing: one context of the model's shape (its values do not
    change the cost of a step)."""

    def __init__(self, config):
        self.context = torch.randn(1, config.text_len, config.text_dim, generator=torch.Generator().manual_seed(0))

    def encode(self, prompt: str) -> torch.Tensor:
        return self.context


def time_pipelined(engines: dict[str, tuple], config, chunks: int = 6,
                   repeats: int = 3) -> dict[tuple[str, str], float]:
    """{(name, decoder kind): seconds per steady chunk} of each opened engine (`{name: (step,
    denoising steps, {kind: decode net})}`, as `time_candidates` opens them) with each of its
    decoders, as `Pipeline.stream` runs them (the DiT a chunk ahead on a worker thread, the decode
    beside it, the cores split between the two): the median interval between consecutive chunks'
    frames after the first two, over `repeats` videos timed in turns. How much two stages slow
    each other down on shared cores differs by backend (measured: AOTInductor's tiny decoder 7 ms
    alone, 20 ms pipelined; ONNX Runtime's 6 and 11), which the stage-by-stage timings cannot
    see. Batch-1 engines only."""
    from asd_deploy.pipeline import Pipeline

    pipes = {(name, kind): (Pipeline(config, step, _FixedContext(config), None, decoder=dec), steps)
             for name, (step, steps, decs) in engines.items() for kind, dec in decs.items()}
    frames = config.pixel_frames_for(chunks * config.frames_per_chunk)
    gaps: dict = {k: [] for k in pipes}
    for r in range(repeats + 1):  # the first round warms every engine up
        for k, (pipe, steps) in pipes.items():
            ready, t0 = [], time.perf_counter()
            for _ in pipe.stream("timing", steps=steps, ffe=False, seed=r, frames=frames):
                ready.append(time.perf_counter() - t0)
            if r:
                gaps[k] += [b - a for a, b in zip(ready[1:], ready[2:])]
    return {k: statistics.median(v) for k, v in gaps.items()}


def time_candidates(folders: dict[str, Path], config, batch: int, repeats: int = 7, warmup: int = 2) -> dict:
    """{name: {"step_s", "decode_s" (the primary decoder's; None without one), "decoders_s" ({kind:
    seconds} for every decoder the engine carries), "pipelined_s" ({kind: seconds per steady chunk
    through the pipeline}, `time_pipelined`; batch-1 engines with a decoder)}} for each built
    engine folder."""
    from asd_deploy.backends import open_engine
    from asd_deploy.backends.manifest import read_manifest
    from asd_deploy.decoders.engine import EngineDecodeNet, decoder_sections

    from .spec import sample_step_inputs

    fns, primary, opened = {}, {}, {}
    for name, folder in folders.items():
        m = read_manifest(folder)
        step = open_engine(folder, m)
        args = tuple(a.to(step.dtype) if a.is_floating_point() else a
                     for a in sample_step_inputs(config, batch, seed=2))
        fns[(name, "step_s")] = lambda step=step, args=args: step(*args)
        primary[name] = (m.get("decoder") or {}).get("kind")
        opened[name] = (step, int(m["schedule"]["steps"]), {})
        for kind in decoder_sections(m):
            dec = opened[name][2][kind] = EngineDecodeNet(folder, m, kind)
            lat = torch.randn(dec.batch, dec.z_dim, dec.frames, dec.h, dec.w)
            caches = tuple(torch.zeros(s) for s in dec.cache_shapes(dec.batch, dec.h, dec.w))
            fns[(name, kind)] = lambda dec=dec, lat=lat, caches=caches: dec.next(lat, caches)
    timed = _round_robin(fns, repeats, warmup)
    out = {}
    piped = time_pipelined(opened, config) if batch == 1 and any(primary.values()) else {}
    for name in folders:
        decs = {k: v for (n, k), v in timed.items() if n == name and k != "step_s"}
        out[name] = {"step_s": timed[(name, "step_s")], "decode_s": decs.get(primary[name]), "decoders_s": decs}
        if piped:
            out[name]["primary"] = primary[name]
            out[name]["pipelined_s"] = {k: v for (n, k), v in piped.items() if n == name}
    return out


def chunk_seconds(timing: dict, steps: int, decoder: str | None = None) -> float:
    """A steady chunk's cost with `decoder` (None: the engine's primary decoder): as the pipeline
    ran it when that was timed (`pipelined_s`), else the stages' sum, `steps` denoising calls + the
    clean pass + the decode."""
    kind = timing.get("primary") if decoder is None else decoder
    piped = (timing.get("pipelined_s") or {}).get(kind)
    if piped is not None:
        return piped
    dec = timing["decode_s"] if decoder is None else (timing.get("decoders_s") or {}).get(decoder)
    return (steps + 1) * timing["step_s"] + (dec or 0.0)


def choose(results: list[dict], steps: int, decoder: str | None = None) -> dict:
    """The fastest candidate that built and timed (by `chunk_seconds` with `decoder`); raises if none did."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        raise RuntimeError("no --backend auto candidate could be built here: "
                           + "; ".join(f"{r['name']}: {r['error']}" for r in results))
    return min(ok, key=lambda r: chunk_seconds(r, steps, decoder))


# 2: per-decoder timings (`decoders_s`, `best_by_decoder`); 3: chosen by the pipelined chunk
# (`pipelined_s`). Bump when the manifest's auto section changes.
AUTO_FORMAT = 3


def decoder_identities(checkpoint: str, config, decoder: str | None, vae: str | None,
                       tiny_decoder: str | None) -> dict[str, str]:
    """{decoder kind: weights hash} of the decoders a build exports: what the engine carries,
    whatever path it came from (the model's own `tiny_decoder/` retrained in place is a new one)."""
    from asd_deploy.decoders.engine import decoder_hash

    from .decoder import decoder_kinds, resolve_decoder

    return {k: decoder_hash(resolve_decoder(k, checkpoint, config, vae, tiny_decoder)[0])
            for k in decoder_kinds(decoder, checkpoint, tiny_decoder)}


def auto_key(loaded, *, checkpoint="default", precision="fp32", steps=1, ffe=True, ffe_steps=4, batch=1,
             decoder=None, vae=None, tiny_decoder=None, candidates=CANDIDATES, cpu=None) -> str:
    """When an auto engine is up to date: the same DiT weights, schedule, decoders' weights,
    candidates, CPU and tools."""
    from asd_deploy.backends.manifest import stage_key

    from .build import _tool_versions

    return stage_key(format=AUTO_FORMAT, config=loaded.config.to_dict(), weights=loaded.weights_hash,
                     precision=precision, steps=steps, ffe=ffe, ffe_steps=ffe_steps, batch=batch, decoder=decoder,
                     decoders=decoder_identities(checkpoint, loaded.config, decoder, vae, tiny_decoder),
                     candidates=list(candidates), cpu=cpu_features() if cpu is None else cpu,
                     tools=_tool_versions("ort"))


def build_auto(*, config=None, checkpoint="default", precision="fp32", steps=1, ffe=True, ffe_steps=4, batch=1,
               out=None, force=False, log=None, decoder=None, vae=None, tiny_decoder=None,
               candidates=CANDIDATES, timer=time_candidates) -> Path:
    """Build each of `candidates` (skipping those that cannot build here, with the reason), time
    them with `timer`, keep the fastest as `<out>/<config>-s<steps>[f4]-auto-<precision>-<weights>`
    (`out`: the user's engine cache by default)."""
    import sys

    from asd_deploy.backends.manifest import (MANIFEST_NAME, EngineError, engine_cache_dir, engine_dir_name,
                                              read_manifest, write_manifest)
    from asd_deploy.backends.auto import auto_build_command
    from asd_deploy.checkpoint import atomic_dir
    from asd_deploy.registry import load_dit

    from .build import build

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    loaded = load_dit(checkpoint, config)
    cfg = loaded.config
    out = Path(out) if out is not None else engine_cache_dir()
    final = out / engine_dir_name(cfg.name, steps, ffe, ffe_steps, "auto", precision, None, batch, loaded.weights_hash)
    cpu = cpu_features()
    key = auto_key(loaded, checkpoint=checkpoint, precision=precision, steps=steps, ffe=ffe, ffe_steps=ffe_steps,
                   batch=batch, decoder=decoder, vae=vae, tiny_decoder=tiny_decoder, candidates=candidates, cpu=cpu)
    if not force and (final / MANIFEST_NAME).is_file():
        try:
            if read_manifest(final).get("auto", {}).get("key") == key:
                log(f"auto engine {final} is up to date (use --force to re-time the candidates)")
                return final
        except EngineError:
            pass
    work = out / f".{final.name}.candidates"
    results, folders = [], {}
    for c in candidates:
        entry = {k: v for k, v in c.items()}
        log(f"[auto] candidate {c['name']} ...")
        try:
            folders[c["name"]] = build(config=config, checkpoint=checkpoint, backend=c["backend"], precision=precision,
                                       steps=steps, ffe=ffe, ffe_steps=ffe_steps, opset=c.get("opset"), batch=batch,
                                       out=out, force=force, log=lambda m: log("    " + m), decoder=decoder, vae=vae,
                                       tiny_decoder=tiny_decoder, inductor_configs=c.get("inductor_configs"),
                                       engine=work / c["name"])
        except (ValueError, RuntimeError, NotImplementedError, ImportError) as e:  # EngineError is a RuntimeError
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"[auto] {c['name']}: not a candidate here ({entry['error']})")
        results.append(entry)
    log(f"[auto] timing {len(folders)} candidates side by side ...")
    timings = timer(folders, cfg, batch) if folders else {}
    for r in results:
        if r["name"] in timings:
            r.update(timings[r["name"]])
            r["chunk_s"] = chunk_seconds(r, steps)
            decs = r.get("decoders_s") or {}
            dec = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in decs.items()) or "-"
            piped = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in (r.get("pipelined_s") or {}).items())
            log(f"[auto] {r['name']}: step {1e3 * r['step_s']:.2f} ms, decode {dec}"
                + (f"; pipelined chunk {piped}" if piped else f", chunk {1e3 * r['chunk_s']:.2f} ms"))
    best = choose(results, steps)
    kinds = {k for r in results for k in (r.get("decoders_s") or {})}
    # the winner with each decoder: a deployment decoding with a non-primary decoder is warned when
    # another candidate would have been faster for it (`pipeline_decoder`)
    by_decoder = {k: choose(results, steps, k)["name"] for k in sorted(kinds)}
    manifest = read_manifest(folders[best["name"]])
    manifest["name"] = final.name
    manifest["rebuild"] = auto_build_command(cfg.name, checkpoint, batch, out) + " --force"
    manifest["auto"] = {"chosen": best["name"], "key": key,
                        "criterion": (f"a steady chunk ({steps} step(s) + clean pass, decoded by the primary "
                                      f"decoder) as the pipeline runs it, median of round-robin timings"
                                      if any(r.get("pipelined_s") for r in results) else
                                      f"{steps} step(s) + clean pass + decode by the primary decoder per steady "
                                      f"chunk, median of round-robin timings"),
                        "best_by_decoder": by_decoder, "candidates": results, "cpu": cpu}
    src = folders[best["name"]]

    def fill(tmp: Path):
        for p in src.iterdir():
            if p.name != MANIFEST_NAME and p.is_file():
                shutil.copy2(p, tmp / p.name)
        write_manifest(tmp, manifest)
    atomic_dir(final, fill)
    shutil.rmtree(work, ignore_errors=True)  # the losers (and the winner's working copy)
    per_chunk = {r["name"]: round(1e3 * r["chunk_s"], 2) for r in results if "chunk_s" in r}
    log(f"[auto] kept {best['name']} as {final} (ms per chunk: {json.dumps(per_chunk)})")
    return final
