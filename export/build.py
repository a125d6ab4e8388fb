"""`python -m export.build`: build an engine folder (artifacts + manifest.json) for one model.

    python -m export.build --steps 1 [--no-ffe] [--ffe-steps 4] [--config tiny|small|medium|wan2.1-1.3b]
        [--checkpoint PATH|default|random] [--backend ort|aoti|trt] [--precision fp32|fp16|bf16]
        [--opset 18|23] [--batch 1] [--out DIR | --engine DIR] [--force] [--no-validate] [--quiet]
        [--decoder vae|tiny|vae,tiny|none] [--vae FOLDER] [--tiny-decoder FOLDER]
    python -m export.build --backend auto ...   (builds ort 18/23 and aoti frozen/not, keeps the fastest here)

Owns: the build stages and the manifest they write, where the folder goes, and one build per
folder at a time. The folder is OUT/NAME, OUT by default the user's engine cache
(`~/.cache/asd-deploy/engines`, see `asd_deploy.backends.manifest.engine_cache_dir`), NAME from
config, schedule, backend, precision, opset, batch and the weights hash; `--engine DIR` builds
exactly DIR (what a rebuild hint for a named folder says). A build holds an exclusive lock on
the folder (`.build.lock`, released by the OS if the build is killed) and first removes the
temporary files a killed build left there. Stages, each skipped when its artifact
exists, is whole (size + sha256) and was made from the same inputs (a content key over config,
weights hash, shapes, precision, opset, tool versions); `--force` rebuilds:
  ort:  export (step.onnx, cross_kv.onnx) -> optimize (ORT offline: *.opt.onnx) -> validate
  aoti: build (torch.export + AOTInductor: step.pt2, cross_kv.pt2) -> validate
  trt:  export -> TensorRT engines for step and cross_kv (strongly typed; opset 23, falling back to 18
        when the parser rejects Attention/RMSNormalization) -> validate on the GPU
        (written to the TensorRT 10.x/11 docs, not run here: no GPU; fails naming what is missing)
  ort/aoti also export the decoders (`--decoder`, default the model's VAE and, when the model ships
  one, its tiny decoder): decode_first and decode_next with the causal cache as inputs/outputs
  (`decoder.py`), under the same manifest; the first listed is the one the C++ runtime runs.
`validate` runs the engine once against the eager model and records the error in the manifest.
Every artifact is written under a temporary name and renamed; the manifest is rewritten after
each stage with complete=false and finally with complete=true, so an interrupted build never
loads and a rerun resumes. Does not own export details (`onnx_export.py`, `aoti_export.py`) or
loading (`asd_deploy/backends`).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import json
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from asd_deploy.backends import open_engine
from asd_deploy.backends.manifest import (FORMAT, MANIFEST_NAME, EngineError, artifact_matches, build_command,
                                          engine_cache_dir, engine_dir_name, file_record, host_info,
                                          is_engine_cache, stage_key, write_manifest)
from asd_deploy.backends.signature import PRECISIONS, precision_dtype, signatures
from asd_deploy.schedule import Schedule

from .spec import export_specs, sample_context, sample_step_inputs

DEFAULT_OPSET = {"ort": 18, "trt": 23, "aoti": None}
# TensorRT parses ONNX `Attention` from 10.14 and `RMSNormalization` from 10.15: a parser that
# rejects only these gets the opset-18 graph (MatMul/Softmax attention, decomposed norms)
TRT_FALLBACK_OPSET = 18
TRT_FALLBACK_OPS = {"Attention", "RMSNormalization"}
# engine vs fp32 eager, max abs error relative to max(1, max |eager|)
VALIDATE_TOL = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 1e-1}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


LOCK_NAME = ".build.lock"


@contextmanager
def build_lock(folder: Path, timeout: float | None = None, log=print):
    """Hold an exclusive lock on `folder` for one build. A second build of the same folder waits
    (or, after `timeout` seconds, raises naming the holder); the OS drops the lock of a killed build."""
    f = open(Path(folder) / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            log(f"another build of {folder} is running (pid {holder}); waiting for it to finish")
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise EngineError(f"another build of {folder} (pid {holder}) still holds {LOCK_NAME} after "
                                          f"{timeout:.0f} s; wait for it, or stop it and rerun") from None
                    time.sleep(0.1)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def remove_stale_temps(folder: Path) -> list[str]:
    """Temporary files and folders a killed build left (`atomic_write`, `atomic_dir` and
    `write_atomically` names all start with a dot and carry `.tmp`/`.old-`). Call with the lock held."""
    gone = []
    for p in Path(folder).iterdir():
        if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return sorted(gone)


def _prepare_folder(folder: Path) -> None:
    """Create the engine folder (and the cache above it, private) or say clearly why it cannot be."""
    if folder.exists() and not folder.is_dir():
        raise EngineError(f"cannot build into {folder}: it is a file, not a folder; choose another --out/--engine")
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise EngineError(f"cannot build into {folder}: {parent} is a file, not a folder")
            break
    try:
        if is_engine_cache(folder.parent):
            folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.tmp.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)  # a concurrent build may have cleaned it up already
    except OSError as e:
        raise EngineError(f"cannot build into {folder}: {e.strerror or e} ({type(e).__name__}); choose a writable "
                          f"--out or --engine") from None


def _read_partial(folder: Path) -> dict:
    """The previous manifest of this folder, finished or not (its artifact records let a rerun skip)."""
    try:
        m = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return m if isinstance(m, dict) and isinstance(m.get("artifacts", {}), dict) else {}


def _backend_version(backend: str) -> str:
    if backend == "ort":
        import onnxruntime
        return onnxruntime.__version__
    if backend == "trt":
        import tensorrt
        return tensorrt.__version__
    return torch.__version__


def _tool_versions(backend: str) -> dict:
    v = {"torch": torch.__version__}
    if backend in ("ort", "trt"):
        import onnx
        import onnxruntime
        import onnxscript
        v.update(onnx=onnx.__version__, onnxscript=onnxscript.__version__, onnxruntime=onnxruntime.__version__)
    return v


def generate_command(engine: Path, backend: str, checkpoint: str, config_name: str, schedule: Schedule) -> str:
    cmd = ["python", "-m", "asd_deploy", "generate", "--backend", backend, "--engine", str(engine),
           "--steps", str(schedule.steps)]
    cmd += ["--ffe-steps", str(schedule.ffe_steps)] if schedule.ffe else ["--no-ffe"]
    if checkpoint != "default":
        cmd += ["--checkpoint", checkpoint, "--config", config_name]
    return shlex.join(cmd)


def _check_request(backend: str, precision: str, opset: int | None, batch: int):
    if backend not in ("ort", "aoti", "trt"):
        raise ValueError(f"--backend must be one of ort, aoti, trt; got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1; got {batch}")
    if backend == "trt":
        from asd_deploy.backends.trt import require_trt
        require_trt()
    if backend == "ort":
        from asd_deploy.backends.ort import check_ort_precision
        check_ort_precision(precision)
        from .onnx_export import MIN_OPSET
        if opset < MIN_OPSET:
            raise ValueError(f"--opset {opset} < {MIN_OPSET}: the dynamo exporter needs >= {MIN_OPSET} "
                             f"(18, or 23 for the fused Attention op)")
    if backend == "aoti" and opset is not None:
        raise ValueError("--opset applies to ONNX backends (ort, trt), not aoti")


def _validate(folder: Path, manifest: dict, model, batch: int) -> dict:
    """The engine once against the fp32 eager model (on the CPU): step (cache 2/3 full) and
    cross_kv. Inputs go to the engine's device and precision; outputs come back to the CPU."""
    engine = open_engine(folder, manifest, device=manifest.get("device", "cpu"))
    cfg = model.config
    ref_model = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
    dev, dtype = torch.device(engine.device), engine.dtype
    inputs = sample_step_inputs(cfg, batch, seed=1)
    ctx = sample_context(cfg, batch, seed=1)
    with torch.no_grad():
        ref = ref_model.forward_step(*inputs) + ref_model.cross_kv(ctx)
    on_engine = tuple(a.to(dev, dtype) if a.is_floating_point() else a.to(dev) for a in inputs)
    got = tuple(o.detach().float().cpu() for o in engine(*on_engine))  # copied: outputs are reused
    got += tuple(o.detach().float().cpu() for o in engine.cross_kv(ctx.to(dev, dtype)))
    names = ("flow", "k_new", "v_new", "cross_k", "cross_v")
    res = {}
    for n, a, r in zip(names, got, ref):
        err = (a - r).abs()
        res[n] = {"max_abs_err": err.max().item(), "mean_abs_err": err.mean().item(),
                  "ref_max_abs": r.abs().max().item()}
    tol = VALIDATE_TOL[manifest["precision"]]
    bad = {n: v for n, v in res.items() if not v["max_abs_err"] <= tol * max(1.0, v["ref_max_abs"])}
    if bad:
        raise EngineError(f"engine {folder} does not match the eager model at {manifest['precision']} (tolerance "
                          f"{tol} x max(1, |ref|)): {bad}; its manifest stays incomplete so it will not load")
    return {"tolerance_rel": tol, "outputs": res}


def build(*, config: str | None = None, checkpoint: str = "default", backend: str = "ort",
          precision: str = "fp32", steps: int = 1, ffe: bool = True, ffe_steps: int = 4, opset: int | None = None,
          batch: int = 1, out=None, engine=None, force: bool = False, validate: bool = True, log=None,
          lock_timeout: float | None = None, decoder: str | None = None, vae: str | None = None,
          tiny_decoder: str | None = None, inductor_configs: dict | None = None) -> Path:
    """Build (or bring up to date) one engine folder; returns its path. `out`: parent folder
    (default: the user's engine cache); `engine`: exactly this folder instead of OUT/NAME.
    `decoder`/`vae`/`tiny_decoder`: the decoders exported beside the DiT, a comma list (`decoder.py`;
    None: the VAE, and the tiny decoder when the model ships one);
    `inductor_configs` (aoti) replaces `INDUCTOR_CONFIGS`. `backend="auto"`: build the
    candidates, time them here, keep the fastest (`auto.py`)."""
    if backend == "auto":
        from .auto import build_auto
        return build_auto(config=config, checkpoint=checkpoint, precision=precision, steps=steps, ffe=ffe,
                          ffe_steps=ffe_steps, batch=batch, out=out, force=force, log=log, decoder=decoder,
                          vae=vae, tiny_decoder=tiny_decoder)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    opset = DEFAULT_OPSET.get(backend) if opset is None else opset
    schedule = Schedule(steps=steps, ffe=ffe, ffe_steps=ffe_steps)  # validates
    _check_request(backend, precision, opset, batch)
    t_start = time.perf_counter()
    out = Path(out) if out is not None else engine_cache_dir()
    if engine is None and out.exists() and not out.is_dir():
        raise EngineError(f"--out {out} is a file; it must be the folder engine folders go in")
    from asd_deploy.registry import load_dit

    from .decoder import decoder_kinds, resolve_decoder

    loaded = load_dit(checkpoint, config)
    cfg = loaded.config
    kinds = decoder_kinds(decoder, checkpoint, tiny_decoder)   # validates the spelling for every backend
    if backend not in ("ort", "aoti"):
        kinds = ()   # decoder engines are CPU graphs for ort and aoti
    dec_args = dict(nets=[(k, *resolve_decoder(k, checkpoint, cfg, vae, tiny_decoder)) for k in kinds],
                    spec=decoder, vae=vae, tiny=tiny_decoder)
    dtype = precision_dtype(precision)
    model = loaded.model if dtype == torch.float32 else copy.deepcopy(loaded.model).to(dtype)
    folder = Path(engine) if engine is not None else out / engine_dir_name(
        cfg.name, steps, ffe, ffe_steps, backend, precision, opset, batch, loaded.weights_hash)
    _prepare_folder(folder)
    with build_lock(folder, lock_timeout, log):
        stale = remove_stale_temps(folder)
        if stale:
            log(f"removed what an interrupted build left: {', '.join(stale)}")
        return _build_locked(folder, loaded, model, cfg, dtype, schedule, checkpoint=checkpoint, backend=backend,
                             precision=precision, opset=opset, batch=batch, out=out, force=force, validate=validate,
                             log=log, t_start=t_start, dec=dec_args, inductor_configs=inductor_configs)


def _build_locked(folder, loaded, model, cfg, dtype, schedule, *, checkpoint, backend, precision, opset, batch, out,
                  force, validate, log, t_start, dec, inductor_configs) -> Path:
    steps, ffe, ffe_steps = schedule.steps, schedule.ffe, schedule.ffe_steps
    args = {"config": cfg.name, "checkpoint": checkpoint, "backend": backend, "precision": precision,
            "opset": opset, "batch": batch, "steps": steps, "ffe": ffe, "ffe_steps": ffe_steps, "out": str(out)}
    rebuild = build_command(**{k: v for k, v in args.items() if k != "out"}, engine=folder, force=True)
    if dec["nets"] and (dec["spec"], dec["vae"], dec["tiny"]) != (None, None, None):
        rebuild += " " + shlex.join(["--decoder", ",".join(k for k, _, _ in dec["nets"])]
                                    + (["--vae", dec["vae"]] if dec["vae"] else [])
                                    + (["--tiny-decoder", dec["tiny"]] if dec["tiny"] else []))
    log(f"engine {folder.name} -> {folder}")
    log(f"  model {cfg.name} ({checkpoint}{'' if loaded.trained else ', RANDOM weights'}), weights "
        f"{loaded.weights_hash[:12]}, {precision}, batch {batch}, {schedule.describe()}")

    old = {} if force else _read_partial(folder)
    old_artifacts = old.get("artifacts", {})
    base = {"format": FORMAT, "backend": backend, "precision": precision, "batch": batch, "opset": opset,
            "config": cfg.to_dict(), "weights_hash": loaded.weights_hash, "tools": _tool_versions(backend)}
    manifest = {
        "format": FORMAT, "complete": False, "name": folder.name, "backend": backend,
        "backend_version": _backend_version(backend), "precision": precision, "dtype": str(dtype).removeprefix("torch."),
        "opset": opset, "batch": batch, "device": "cpu",
        "model": {"config": cfg.to_dict(), "config_name": cfg.name, "checkpoint": checkpoint,
                  "weights_hash": loaded.weights_hash, "trained": loaded.trained},
        "schedule": schedule.to_dict(), "shapes": {k: s.to_dict() for k, s in signatures(cfg, batch, dtype).items()},
        "artifacts": {}, "runtime": {}, "torch_version": torch.__version__, "tool_versions": _tool_versions(backend),
        "host": host_info(), "rebuild": rebuild,
        "build": {"args": args, "started": _now(), "seconds": {}, "command": "python -m export.build " +
                  shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("build.py") else None},
    }
    rebuilt = False
    specs = {s.name: s for s in export_specs(model, batch, opset if backend != "aoti" else None)}

    def stage(name: str, artifact: str, key: str, make):
        nonlocal rebuilt
        if not force and artifact_matches(folder, artifact, old_artifacts.get(artifact), key):
            log(f"[{name}] {artifact}: up to date, skipped")
            manifest["artifacts"][artifact] = old_artifacts[artifact]
            for side in old_artifacts[artifact].get("data", []):
                manifest["artifacts"][side] = old_artifacts[side]
            return
        log(f"[{name}] {artifact} ...")
        t0 = time.perf_counter()
        files = make(folder / artifact)
        secs = time.perf_counter() - t0
        rec = file_record(files[0], name, key)
        if len(files) > 1:
            rec["data"] = [f.name for f in files[1:]]
            for f in files[1:]:
                manifest["artifacts"][f.name] = file_record(f, name, key)
        manifest["artifacts"][artifact] = rec
        manifest["build"]["seconds"][artifact] = round(secs, 2)
        write_manifest(folder, manifest)  # complete=false: records progress, never loads
        rebuilt = True
        log(f"[{name}] {artifact}: {secs:.1f} s, {rec['bytes'] / 1e6:.2f} MB")

    if backend == "ort":
        from .onnx_export import export_onnx, optimize_onnx
        for g in ("step", "cross_kv"):
            key = stage_key(stage="export", graph=g, **base)
            stage("export", f"{g}.onnx", key, lambda p, g=g: export_onnx(specs[g], p, opset))
        for g in ("step", "cross_kv"):
            key = stage_key(stage="optimize", graph=g, src=manifest["artifacts"][f"{g}.onnx"]["sha256"], **base)
            stage("optimize", f"{g}.opt.onnx", key, lambda p, g=g: optimize_onnx(folder / f"{g}.onnx", p))
        manifest["runtime"] = {"step": "step.opt.onnx", "cross_kv": "cross_kv.opt.onnx"}
        manifest["portable"] = {"step": "step.onnx", "cross_kv": "cross_kv.onnx"}
        manifest["ort_optimization"] = "extended (CPU provider)"
    elif backend == "trt":  # NOT RUN HERE (no GPU / TensorRT): written to the TensorRT 10.x/11 docs
        from asd_deploy.backends.trt import (TRTBuildError, TRTParseError, build_trt_engine, engine_name, gpu_tag,
                                             timing_cache_name)

        from .onnx_export import export_onnx
        for g in ("step", "cross_kv"):
            key = stage_key(stage="export", graph=g, **base)
            stage("export", f"{g}.onnx", key, lambda p, g=g: export_onnx(specs[g], p, opset))
        gpu, version = gpu_tag(), manifest["backend_version"]
        shapes_key = f"{cfg.name}-b{batch}-k{cfg.max_cache_frames}"
        cache_file = folder.parent / timing_cache_name(version, gpu)
        # the ONNX opset each engine was parsed from (a parser without `Attention` falls back to 18)
        manifest["trt_onnx_opset"] = dict(old.get("trt_onnx_opset", {}))
        specs18, engines = None, {}
        for g in ("step", "cross_kv"):
            eng = engine_name(version, gpu, shapes_key, precision, graph=g)

            def make(p, g=g):
                nonlocal specs18
                try:
                    files = [build_trt_engine(folder / f"{g}.onnx", p, precision, cache_file, log=log)]
                    manifest["trt_onnx_opset"][g] = opset
                    return files
                except TRTParseError as e:
                    if opset <= TRT_FALLBACK_OPSET or not e.ops <= TRT_FALLBACK_OPS:
                        raise
                    log(f"[build] TensorRT {version} rejects {sorted(e.ops)} at opset {opset}; "
                        f"exporting {g} at opset {TRT_FALLBACK_OPSET}")
                except TRTBuildError:  # parsed, but e.g. no fp32 kernel for the fused Attention
                    if opset <= TRT_FALLBACK_OPSET:
                        raise
                    log(f"[build] TensorRT {version} built no engine of {g} at opset {opset}; "
                        f"exporting it at opset {TRT_FALLBACK_OPSET} (no fused operators)")
                specs18 = specs18 or {s.name: s for s in export_specs(model, batch, TRT_FALLBACK_OPSET)}
                src = folder / f"{g}.op{TRT_FALLBACK_OPSET}.onnx"
                side = export_onnx(specs18[g], src, TRT_FALLBACK_OPSET)
                files = [build_trt_engine(src, p, precision, cache_file, log=log)]
                manifest["trt_onnx_opset"][g] = TRT_FALLBACK_OPSET
                return files + side
            key = stage_key(stage="build", graph=g, gpu=gpu, src=manifest["artifacts"][f"{g}.onnx"]["sha256"], **base)
            stage("build", eng, key, make)
            engines[g] = eng
        manifest.update(gpu=gpu, device="cuda", trt_version=version)
        manifest["runtime"] = {"step": engines["step"], "cross_kv": engines["cross_kv"]}
    elif backend == "aoti":
        from .aoti_export import INDUCTOR_CONFIGS, export_aoti
        base["cpu_isa"] = manifest["host"]["cpu_isa"]
        inductor_configs = dict(INDUCTOR_CONFIGS if inductor_configs is None else inductor_configs)
        base["inductor_configs"] = manifest["inductor_configs"] = inductor_configs
        for g in ("step", "cross_kv"):
            key = stage_key(stage="build", graph=g, **base)
            stage("build", f"{g}.pt2", key, lambda p, g=g: export_aoti(specs[g], p, inductor_configs))
        manifest["runtime"] = {"step": "step.pt2", "cross_kv": "cross_kv.pt2"}
    if dec["nets"]:
        from .decoder import build_decoder
        manifest["decoders"] = {}
        for i, (kind, net, source) in enumerate(dec["nets"]):
            log(f"  decoder: {kind} from {source}" + (" (primary: the C++ runtime's)" if i == 0 and
                                                      len(dec["nets"]) > 1 else ""))
            # batch 1 whatever the DiT's batch: every consumer (a pipeline, a server slot) decodes
            # one stream at a time
            meta, dec_runtime = build_decoder(stage, folder, net, source, kind, cfg, 1, backend, base, opset,
                                              inductor_configs, primary=i == 0)
            manifest["decoders"][kind] = meta
            manifest["runtime"].update(dec_runtime)
        manifest["decoder"] = manifest["decoders"][dec["nets"][0][0]]

    if not rebuilt and old.get("complete") and old.get("runtime") == manifest["runtime"]:
        log("engine is up to date (use --force to rebuild)")
        return folder
    if validate:
        log("[validate] engine vs eager (fp32) ...")
        t0 = time.perf_counter()
        manifest["validation"] = _validate(folder, manifest, loaded.model, batch)
        worst = max(v["max_abs_err"] for v in manifest["validation"]["outputs"].values())
        log(f"[validate] max abs error {worst:.2e} over flow, k_new, v_new, cross_k, cross_v "
            f"({time.perf_counter() - t0:.1f} s)")
        from .decoder import validate_decoder
        for kind, net, _ in dec["nets"]:
            manifest["decoders"][kind]["validation"] = v = validate_decoder(folder, manifest, net, kind=kind)
            log(f"[validate] {kind} decoder: max abs error {v['max_abs_err']:.2e} against the {v['reference']}")
    manifest["complete"] = True
    manifest["build"]["finished"] = _now()
    manifest["build"]["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    write_manifest(folder, manifest)
    log(f"done in {time.perf_counter() - t_start:.1f} s")
    return folder


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=1, help="denoising steps per chunk the engine is built for (1-4)")
    ap.add_argument("--ffe", action=argparse.BooleanOptionalAction, default=True,
                    help="First-Frame Enhancement: the first chunk uses --ffe-steps (recorded in the manifest)")
    ap.add_argument("--ffe-steps", type=int, default=4, help="steps for the first chunk with --ffe")
    ap.add_argument("--config", default=None, help="model config preset: tiny, small, medium, wan2.1-1.3b "
                                                     "(default: the default model's, or wan2.1-1.3b for a PATH)")
    ap.add_argument("--checkpoint", default="default", help="'default' (embedded model), 'random' (seeded random "
                                                            "weights at --config) or a checkpoint PATH")
    ap.add_argument("--backend", default="ort", choices=("ort", "aoti", "trt", "auto"),
                    help="auto: build ort opset 18/23 and aoti frozen/not, time them here, keep the fastest")
    ap.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (ort default 18; 23 = fused Attention)")
    ap.add_argument("--batch", type=int, default=1, help="static batch size")
    ap.add_argument("--out", default=None,
                    help="parent folder of engine folders (default: your engine cache, $ASD_DEPLOY_ENGINES or "
                         "$XDG_CACHE_HOME/asd-deploy/engines or ~/.cache/asd-deploy/engines)")
    ap.add_argument("--engine", default=None, help="build exactly this engine folder (instead of OUT/NAME)")
    ap.add_argument("--force", action="store_true", help="rebuild every stage")
    ap.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                    help="run the engine once against the eager model and record the error")
    ap.add_argument("--quiet", action="store_true", help="no progress lines (errors and the result still print)")
    ap.add_argument("--decoder", default=None,
                    help="decoders exported beside the DiT (ort, aoti), a comma list: vae (the model's VAE), tiny "
                         "(its tiny decoder), e.g. vae,tiny; or none. The first is the one the C++ runtime runs. "
                         "Default: vae, and tiny when the model ships one")
    ap.add_argument("--vae", default=None, help="VAE folder for --decoder vae (default: the model's)")
    ap.add_argument("--tiny-decoder", default=None,
                    help="tiny decoder folder for --decoder tiny (default: the model's)")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    log = (lambda msg: None) if args.quiet else None
    try:
        folder = build(config=args.config, checkpoint=args.checkpoint, backend=args.backend,
                       precision=args.precision, steps=args.steps, ffe=args.ffe, ffe_steps=args.ffe_steps,
                       opset=args.opset, batch=args.batch, out=args.out, engine=args.engine, force=args.force,
                       validate=args.validate, log=log, decoder=args.decoder, vae=args.vae,
                       tiny_decoder=args.tiny_decoder)
    except KeyboardInterrupt:
        print("interrupted: no finished manifest was written, so the engine will not load; rerun the same "
              "command to resume (finished stages are kept)", file=sys.stderr)
        return 130
    except (EngineError, ValueError, RuntimeError, NotImplementedError, ImportError, OSError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.strerror else f"{e.strerror}: {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    m = json.loads((folder / MANIFEST_NAME).read_text())
    sched = Schedule(**{k: m["schedule"][k] for k in ("steps", "ffe", "ffe_steps", "shift")})
    print(f"engine: {folder}")
    backend = "auto" if m.get("auto") else m["backend"]
    if m.get("auto"):
        print(f"chosen here: {m['auto']['chosen']} (" + ", ".join(
            f"{c['name']} {1e3 * c['chunk_s']:.2f} ms" if "chunk_s" in c else f"{c['name']}: {c['error']}"
            for c in m["auto"]["candidates"]) + " per chunk)")
    cmd = generate_command(folder, backend, m["model"]["checkpoint"], m["model"]["config_name"], sched)
    print(f"generate with: {cmd}")
    if m["backend"] == "aoti" and m.get("device", "cpu") == "cpu":
        print(f"or natively (C++, see README): ./build/asd_stream --engine {folder} --prompt prompt.npy --out latents.npy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
