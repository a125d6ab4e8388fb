"""Engine folders and their `manifest.json`: where they live, naming, the schema, validation on load.

Owns: the engine cache location and which folders discovery may load, the engine folder name, the
manifest schema and its checker, the exact rebuild command, artifact records (size + sha256) and
`validate_manifest`, which every engine load goes through. Does not own how artifacts are made
(`export/`) or run (the backend modules).

An engine folder holds the artifacts of one build (e.g. `step.onnx`, `cross_kv.onnx`,
`step.pt2`, `cross_kv.pt2`) and `manifest.json`, written last. While a build runs, the manifest
says `"complete": false` (it records finished stages so an interrupted build resumes); only a
complete manifest loads. Every artifact is written under a temporary name and renamed, so a file
under its final name is always whole; its recorded size and sha256 catch later damage.

An engine is code: an AOTInductor package is a shared library that runs when it is loaded, and an
ONNX graph is a program for its runtime. A manifest cannot vouch for its folder (whoever wrote the
folder wrote the manifest), so engines load only from a folder the user named (`--engine DIR`) or
from the user's own engine cache, `engine_cache_dir()`, never from the working directory; and
discovery skips cache folders that someone else owns or that others can write.

Manifest keys (`MANIFEST_SCHEMA` is the checked subset): format, complete, name, backend,
backend_version, precision, dtype, opset, batch, device, model {config, config_name, checkpoint,
weights_hash, trained}, schedule, shapes {step, cross_kv}, artifacts {file: {bytes, sha256, stage,
key}}, runtime {step, cross_kv} (files the runtime loads on this device type), portable (ort: the
plain .onnx files, for GPU providers and other runtimes), torch_version, host, build {args,
started, finished, seconds, command}, validation (engine vs eager errors measured at build
time), rebuild (the command). Every file a manifest names is a plain name inside its folder.
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


def engine_cache_dir() -> Path:
    """The user's engine cache, where `export.build` writes and discovery looks:
    `$ASD_DEPLOY_ENGINES` (an absolute path), else `$XDG_CACHE_HOME/asd-deploy/engines`, else
    `~/.cache/asd-deploy/engines`. Never the working directory."""
    env = os.environ.get("ASD_DEPLOY_ENGINES")
    if env:
        p = Path(env).expanduser()
        if not p.is_absolute():
            raise EngineError(f"$ASD_DEPLOY_ENGINES={env!r} is a relative path, which would trust whatever "
                              f"folder the command runs in; set it to an absolute path you own, or unset it "
                              f"(engines then live in ~/.cache/asd-deploy/engines)")
        return p
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative is ignored
    return base / "asd-deploy" / "engines"


def is_engine_cache(path: str | os.PathLike) -> bool:
    """Is `path` the engine cache (False too when the cache setting itself is invalid)?"""
    try:
        return Path(path) == engine_cache_dir()
    except EngineError:
        return False


def untrusted_reason(path: Path) -> str | None:
    """Why discovery must not load `path` (a folder or file it found, not one the user named):
    owned by another user, or writable by others. None when it is the user's own."""
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot stat it ({e.strerror})"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & 0o002:
        return "writable by every user"
    return None


def engine_dir_name(config_name: str, steps: int, ffe: bool, ffe_steps: int, backend: str, precision: str,
                    opset: int | None, batch: int = 1, weights_hash: str = "") -> str:
    """e.g. `tiny-s1f4-ort-fp32-op18-54826c8a`, `small-s1-aoti-bf16-b2-0f3c9a1e`: the weights hash
    (8 hex digits) keeps engines of different checkpoints at one config apart."""
    name = f"{config_name}-s{steps}" + (f"f{ffe_steps}" if ffe else "") + f"-{backend}-{precision}"
    if opset is not None:
        name += f"-op{opset}"
    name += f"-b{batch}" if batch != 1 else ""
    return name + (f"-{weights_hash[:8]}" if weights_hash else "")


def build_command(config: str | None, checkpoint: str, backend: str, precision: str = "fp32",
                  opset: int | None = None, batch: int = 1, steps: int = 1, ffe: bool = True, ffe_steps: int = 4,
                  out: str | os.PathLike | None = None, force: bool = False,
                  engine: str | os.PathLike | None = None) -> str:
    """The exact `python -m export.build ...` command for these settings. `engine` builds exactly
    that folder (what a rebuild hint for a named folder needs); `out` is the parent of a new one."""
    cmd = ["python", "-m", "export.build", "--steps", str(steps)]
    cmd += ["--ffe-steps", str(ffe_steps)] if ffe and ffe_steps != 4 else [] if ffe else ["--no-ffe"]
    if config and checkpoint != "default":
        cmd += ["--config", config]
    cmd += ["--checkpoint", str(checkpoint), "--backend", backend, "--precision", precision]
    if opset is not None:
        cmd += ["--opset", str(opset)]
    if batch != 1:
        cmd += ["--batch", str(batch)]
    if engine is not None:
        cmd += ["--engine", str(engine)]
    elif out is not None:
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
    return (isinstance(record, dict) and record.get("key") == key and path.is_file() and not path.is_symlink()
            and path.stat().st_size == record.get("bytes") and sha256_file(path) == record.get("sha256"))


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


class _MapOf:
    """Schema of a dict whose values all follow `value` (and whose keys are file names if `file_keys`)."""

    def __init__(self, value, file_keys: bool = False):
        self.value, self.file_keys = value, file_keys


class _Optional:
    def __init__(self, schema):
        self.schema = schema


_NUM = (int, float)
_FILE = "a plain file name inside the engine folder"
# The keys every reader (Python here, C++ in csrc/runtime.cpp) relies on; others may be added freely.
MANIFEST_SCHEMA = {
    "format": int, "complete": bool, "name": str, "backend": str, "precision": str, "batch": int,
    "opset": (int, type(None)), "device": str, "torch_version": str, "host": dict, "shapes": dict,
    "model": {"config": dict, "config_name": str, "checkpoint": str, "weights_hash": str},
    "schedule": {"steps": int, "ffe": bool, "ffe_steps": int, "shift": _NUM},
    "artifacts": _MapOf({"bytes": int, "sha256": str, "data": _Optional([_FILE])}, file_keys=True),
    "runtime": {"step": _FILE, "cross_kv": _FILE},
    "portable": _Optional(_MapOf(_FILE)),
}


def _type_name(t) -> str:
    return " or ".join("null" if x is type(None) else x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _is_plain_file_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def schema_errors(value, schema, where: str = "manifest") -> list[str]:
    """What in `value` breaks `schema` (dict = required keys, `_MapOf`, `_Optional`, a one-item list
    = list of, `_FILE` = a plain file name, a type or tuple of types), as readable lines."""
    if isinstance(schema, _Optional):
        return [] if value is None else schema_errors(value, schema.schema, where)
    if schema is _FILE:
        return [] if _is_plain_file_name(value) else [f"{where} is {value!r}, expected {_FILE}"]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where} is {type(value).__name__}, expected an object"]
        errs = []
        for k, sub in schema.items():
            if k not in value:
                if not isinstance(sub, _Optional):
                    errs.append(f"{where}.{k} is missing")
                continue
            errs += schema_errors(value[k], sub, f"{where}.{k}")
        return errs
    if isinstance(schema, _MapOf):
        if not isinstance(value, dict):
            return [f"{where} is {type(value).__name__}, expected an object"]
        errs = []
        for k, v in value.items():
            if schema.file_keys and not _is_plain_file_name(k):
                errs.append(f"{where} names {k!r}, expected {_FILE}")
            errs += schema_errors(v, schema.value, f"{where}[{k!r}]")
        return errs
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where} is {type(value).__name__}, expected a list"]
        return [e for i, v in enumerate(value) for e in schema_errors(v, schema[0], f"{where}[{i}]")]
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types:  # bool is an int to isinstance, not to a manifest
        return [f"{where} is {value!r}, expected {_type_name(schema)}"]
    if not isinstance(value, types):
        return [f"{where} is {type(value).__name__} {value!r:.40}, expected {_type_name(schema)}"]
    return []


def _default_hint() -> str:
    return "; build one with: python -m export.build --steps 1 --backend ort"


def read_manifest(engine_dir: str | os.PathLike, rebuild_hint: str | None = None) -> dict:
    """The manifest of a finished build, checked against `MANIFEST_SCHEMA`, or an EngineError
    naming what is wrong and the command that rebuilds this folder."""
    d = Path(engine_dir)
    hint = f"; rebuild: {rebuild_hint}" if rebuild_hint else _default_hint()
    if not d.is_dir():
        raise EngineError(f"engine folder {d} does not exist{hint}")
    path = d / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(f"engine folder {d} has no {MANIFEST_NAME}: its build did not finish (interrupted?) "
                          f"or this is not an engine folder{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path} is unreadable ({e}){hint}") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest object{hint}")
    if not rebuild_hint:
        try:  # the recorded build arguments, pointed at this very folder
            hint = f"; rebuild: {rebuild_for(manifest, d)}"
        except Exception:  # arguments too damaged to reuse: the generic hint stays
            pass
    if manifest.get("format") != FORMAT:
        raise EngineError(f"{path} has manifest format {manifest.get('format')!r}, this version reads {FORMAT}{hint}")
    if manifest.get("complete") is not True:
        raise EngineError(f"the build of {d} did not finish (manifest says complete={manifest.get('complete')!r}; "
                          f"interrupted?){hint}")
    errs = schema_errors(manifest, MANIFEST_SCHEMA)
    if not errs:
        try:
            ModelConfig.from_dict(manifest["model"]["config"])
        except (ValueError, TypeError) as e:
            errs = [f"manifest.model.config is not a model config ({e})"]
    if errs:
        raise EngineError(f"{path} does not follow the manifest schema (damaged or hand-edited): "
                          + "; ".join(errs[:5]) + (f" (+{len(errs) - 5} more)" if len(errs) > 5 else "") + hint)
    return manifest


def rebuild_for(manifest: dict, engine_dir: Path, config: ModelConfig | None = None,
                checkpoint: str | None = None) -> str:
    """The command that rebuilds exactly this engine folder (wherever it is, whatever its name),
    for the requested model where one is given."""
    build = manifest.get("build")
    args = dict(build.get("args", {})) if isinstance(build, dict) and isinstance(build.get("args"), dict) else {}
    if config is not None:
        args["config"] = config.name if config.name in PRESETS else args.get("config")
    if checkpoint is not None:
        args["checkpoint"] = checkpoint
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    args.setdefault("config", model.get("config_name"))
    args.setdefault("checkpoint", model.get("checkpoint", "default"))
    args.setdefault("backend", manifest.get("backend", "ort"))
    known = ("config", "checkpoint", "backend", "precision", "opset", "batch", "steps", "ffe", "ffe_steps")
    return build_command(**{k: v for k, v in args.items() if k in known}, engine=Path(engine_dir), force=True)


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
    root = d.resolve()
    for name, rec in sorted(manifest["artifacts"].items()):
        path = d / name
        if path.is_symlink() or path.resolve().parent != root:
            fail(f"{name} is a link to {path.resolve()}: an engine folder holds its own files")
        if not path.is_file():
            fail(f"{name} is missing")
        if verify in ("full", "size") and path.stat().st_size != rec["bytes"]:
            fail(f"{name} is {path.stat().st_size} bytes, the build wrote {rec['bytes']} (truncated or replaced)")
        if verify == "full" and sha256_file(path) != rec["sha256"]:
            fail(f"{name} is corrupt: its sha256 differs from the one recorded at build time")
    return cfg


def find_engines(engines_dir: str | os.PathLike | None = None,
                 skipped: list[str] | None = None) -> list[tuple[Path, dict]]:
    """(folder, manifest) of every finished build under `engines_dir` (default: the engine cache)
    that its user owns and others cannot write, newest first. One bad folder never hides its
    neighbours: each folder passed over is named in `skipped` with the reason."""
    root = Path(engines_dir) if engines_dir is not None else engine_cache_dir()
    found = []
    skipped = [] if skipped is None else skipped
    for m in sorted(root.glob(f"*/{MANIFEST_NAME}")) if root.is_dir() else []:
        d = m.parent
        why = untrusted_reason(root) or untrusted_reason(d) or next(
            (f"{f.name}: {r}" for f in sorted(d.iterdir()) if (r := untrusted_reason(f))), None)
        if why:
            skipped.append(f"{d.name} (not loaded: {why})")
            continue
        try:
            found.append((d, read_manifest(d)))
        except EngineError as e:
            skipped.append(f"{d.name} ({str(e).split('; build one')[0].split('; rebuild')[0]})")
    return sorted(found, key=lambda dm: str(dm[1].get("build", {}).get("finished", "")), reverse=True)
