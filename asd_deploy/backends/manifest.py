"""Engine folders and their `manifest.json`: naming, writing, and validation on load.

Owns: the engine folder name, the manifest schema, the exact rebuild command, artifact records
(size + sha256) and `validate_manifest`, which every engine load goes through. Does not own how
artifacts are made (`export/`) or run (the backend modules).

An engine folder holds the artifacts of one build (e.g. `step.onnx`, `cross_kv.onnx`,
`step.pt2`, `cross_kv.pt2`) and `manifest.json`, written last. While a build runs, the manifest
says `"complete": false` (it records finished stages so an interrupted build resumes); only a
complete manifest loads. Every artifact is written under a temporary name and renamed, so a file
under its final name is always whole; its recorded size and sha256 catch later damage.

Manifest keys: format, complete, name, backend, backend_version, precision, dtype, opset, batch,
device, model {config, config_name, checkpoint, weights_hash, trained}, schedule, shapes {step,
cross_kv}, artifacts {file: {bytes, sha256, stage, key}}, runtime {step, cross_kv} (files the
runtime loads on this device type), portable (ort: the plain .onnx files, for GPU providers and
other runtimes), torch_version, host, build {args, started, finished, seconds, command},
validation (engine vs eager errors measured at build time), rebuild (the command).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import socket
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..config import PRESETS, ModelConfig
from .signature import precision_dtype, signatures

MANIFEST_NAME = "manifest.json"
FORMAT = 1
ENGINE_BACKENDS = ("ort", "aoti", "trt")


class EngineError(RuntimeError):
    """An engine that cannot be used as asked: stale, incomplete, damaged or missing. The message
    says what was expected, what was found, and the exact command that rebuilds it."""


def default_engines_dir() -> Path:
    """`$ASD_DEPLOY_ENGINES`, else `engines/` under the working directory (the repo root)."""
    return Path(os.environ.get("ASD_DEPLOY_ENGINES", "engines"))


def engine_dir_name(config_name: str, steps: int, ffe: bool, ffe_steps: int, backend: str, precision: str,
                    opset: int | None, batch: int = 1) -> str:
    """e.g. `tiny-s1-ort-fp32-op18`, `tiny-s2f4-aoti-bf16`, `small-s1-ort-fp32-op23-b2`."""
    name = f"{config_name}-s{steps}" + (f"f{ffe_steps}" if ffe else "") + f"-{backend}-{precision}"
    if opset is not None:
        name += f"-op{opset}"
    return name + (f"-b{batch}" if batch != 1 else "")


def build_command(config: str | None, checkpoint: str, backend: str, precision: str = "fp32",
                  opset: int | None = None, batch: int = 1, steps: int = 1, ffe: bool = False, ffe_steps: int = 4,
                  out: str | os.PathLike | None = None, force: bool = False) -> str:
    """The exact `python -m export.build ...` command for these settings."""
    cmd = ["python", "-m", "export.build", "--steps", str(steps)]
    if ffe:
        cmd += ["--ffe", "--ffe-steps", str(ffe_steps)]
    if config and checkpoint != "default":
        cmd += ["--config", config]
    cmd += ["--checkpoint", str(checkpoint), "--backend", backend, "--precision", precision]
    if opset is not None:
        cmd += ["--opset", str(opset)]
    if batch != 1:
        cmd += ["--batch", str(batch)]
    if out is not None:
        cmd += ["--out", str(out)]
    if force:
        cmd.append("--force")
    return shlex.join(cmd)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path, stage: str, key: str) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path), "stage": stage, "key": key}


def artifact_matches(engine_dir: Path, name: str, record: dict | None, key: str) -> bool:
    """Is `name` present, whole, and made from the same inputs (stage key) as wanted now?"""
    path = engine_dir / name
    return (record is not None and record.get("key") == key and path.is_file()
            and path.stat().st_size == record["bytes"] and sha256_file(path) == record["sha256"])


def stage_key(**inputs) -> str:
    """Content key of a build stage: everything its artifact depends on."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cpu_isa() -> str:
    """The SIMD level Inductor compiles CPU kernels for (an AOTI package needs it at run time)."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        return str(pick_vec_isa()) or "none"
    except Exception:  # private API; absence only loses the check
        return "unknown"


def host_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "cpu_isa": cpu_isa(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def write_manifest(engine_dir: Path, manifest: dict) -> Path:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    return atomic_write(Path(engine_dir) / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text))


def read_manifest(engine_dir: str | os.PathLike, rebuild_hint: str | None = None) -> dict:
    """The manifest of a finished build, or an EngineError naming what is wrong."""
    d = Path(engine_dir)
    hint = f"; rebuild: {rebuild_hint}" if rebuild_hint else \
        "; build one with: python -m export.build --steps 1 --backend ort (see engines/README.md)"
    if not d.is_dir():
        raise EngineError(f"engine folder {d} does not exist{hint}")
    path = d / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(f"engine folder {d} has no {MANIFEST_NAME}: its build did not finish (interrupted?) "
                          f"or this is not an engine folder{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{path} is unreadable ({e}){hint}") from None
    rebuild = rebuild_hint or manifest.get("rebuild", hint)
    if manifest.get("format") != FORMAT:
        raise EngineError(f"{path} has manifest format {manifest.get('format')!r}, this version reads {FORMAT}; "
                          f"rebuild: {rebuild}")
    if not manifest.get("complete"):
        raise EngineError(f"the build of {d} did not finish (manifest says complete=false; interrupted?); "
                          f"rebuild: {rebuild}")
    return manifest


def rebuild_for(manifest: dict, engine_dir: Path, config: ModelConfig | None = None,
                checkpoint: str | None = None) -> str:
    """The command that rebuilds this engine, for the requested model where one is given."""
    args = dict(manifest.get("build", {}).get("args", {}))
    if config is not None:
        args["config"] = config.name if config.name in PRESETS else args.get("config")
    if checkpoint is not None:
        args["checkpoint"] = checkpoint
    args.setdefault("checkpoint", "default")
    args.setdefault("backend", manifest.get("backend", "ort"))
    args["out"] = str(Path(engine_dir).parent)
    known = ("config", "checkpoint", "backend", "precision", "opset", "batch", "steps", "ffe", "ffe_steps", "out")
    return build_command(**{k: v for k, v in args.items() if k in known}, force=True)


def _config_diff(a: ModelConfig, b: ModelConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    diff = [f"{k}: engine {da[k]!r} vs requested {db[k]!r}" for k in sorted(da) if k != "name" and da[k] != db.get(k)]
    return ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")


def validate_manifest(engine_dir: str | os.PathLike, manifest: dict, *, expect_config: ModelConfig | None = None,
                      expect_hash: str | None = None, expect_backend: str | None = None,
                      expect_batch: int | None = None, expect_precision: str | None = None,
                      expect_checkpoint: str | None = None, verify: str = "full") -> ModelConfig:
    """Check the manifest against the request and the artifacts against their records.

    verify: "full" (size + sha256 of every runtime artifact), "size" (size only: fast for
    multi-GB engines) or "none". Returns the engine's config."""
    d = Path(engine_dir)
    rebuild = rebuild_for(manifest, d, expect_config, expect_checkpoint)

    def fail(what):
        raise EngineError(f"engine {d}: {what}; rebuild: {rebuild}")

    cfg = ModelConfig.from_dict(manifest["model"]["config"])
    if expect_backend is not None and manifest["backend"] != expect_backend:
        fail(f"it is a {manifest['backend']!r} engine, {expect_backend!r} was requested")
    if expect_config is not None and cfg != expect_config:
        fail(f"built for config {manifest['model'].get('config_name')!r}, requested {expect_config.name!r} "
             f"({_config_diff(cfg, expect_config)})")
    if expect_hash is not None and manifest["model"]["weights_hash"] != expect_hash:
        fail(f"built from weights {manifest['model']['weights_hash'][:12]}... "
             f"({manifest['model'].get('checkpoint')}), requested weights {expect_hash[:12]}... "
             f"({expect_checkpoint or 'given model'}): the engine is stale")
    if expect_batch is not None and manifest["batch"] != expect_batch:
        fail(f"built for batch {manifest['batch']}, requested batch {expect_batch}")
    if expect_precision is not None and manifest["precision"] != expect_precision:
        fail(f"built at precision {manifest['precision']}, requested {expect_precision}")
    want = {k: s.to_dict() for k, s in signatures(cfg, manifest["batch"],
                                                     precision_dtype(manifest["precision"])).items()}
    if manifest.get("shapes") != want:
        fail(f"its recorded static shapes {manifest.get('shapes')} differ from those its config implies {want}")
    if manifest["backend"] == "aoti":
        if manifest.get("torch_version") != torch.__version__:
            fail(f"AOTInductor packages run only on the torch that built them: built with torch "
                 f"{manifest.get('torch_version')}, this is torch {torch.__version__}")
        built_isa, here = manifest.get("host", {}).get("cpu_isa"), cpu_isa()
        if manifest.get("device", "cpu") == "cpu" and "unknown" not in (built_isa, here) and built_isa != here:
            fail(f"compiled for CPU ISA {built_isa}, this machine supports {here}")
    for role, name in [*manifest["runtime"].items(), *manifest.get("portable", {}).items()]:
        if name not in manifest["artifacts"]:
            fail(f"manifest names {name} for {role} but has no record of it")
    for name, rec in sorted(manifest["artifacts"].items()):
        path = d / name
        if not path.is_file():
            fail(f"{name} is missing")
        if verify in ("full", "size") and path.stat().st_size != rec["bytes"]:
            fail(f"{name} is {path.stat().st_size} bytes, the build wrote {rec['bytes']} (truncated or replaced)")
        if verify == "full" and sha256_file(path) != rec["sha256"]:
            fail(f"{name} is corrupt: its sha256 differs from the one recorded at build time")
    return cfg


def find_engines(engines_dir: str | os.PathLike | None = None) -> list[tuple[Path, dict]]:
    """(folder, manifest) of every finished build under `engines_dir`, newest first."""
    root = Path(engines_dir) if engines_dir is not None else default_engines_dir()
    found = []
    for m in sorted(root.glob(f"*/{MANIFEST_NAME}")) if root.is_dir() else []:
        try:
            found.append((m.parent, read_manifest(m.parent)))
        except EngineError:
            continue
    return sorted(found, key=lambda dm: dm[1].get("build", {}).get("finished", ""), reverse=True)
