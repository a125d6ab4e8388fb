"""Backends: every way to run the chunk step, behind the one signature `generate()` takes.

Owns: `make_backend` (a backend by name, from a loaded DiT or an engine folder), `load_engine`
(an engine folder, validated against the requested model first) and `find_engine` (an engine
in the user's engine cache, `manifest.engine_cache_dir()`, by its manifest). Backends:
  eager    `EagerStep` (generator.py)                          from the eager model
  compile  `CompiledStep`: torch.compile(fullgraph) of the step from the eager model
  ort      `OrtStep`: ONNX Runtime, I/O-bound cache buffers   from an engine folder
  aoti     `AotiStep`: AOTInductor `.pt2` packages             from an engine folder
  trt      `TRTStep`: TensorRT step + cross_kv engines (trt.py)  from an engine folder
  graphs   `GraphedStep` wraps any of them in CUDA graphs (graphs.py)
Each has `config`, `dtype`, `device`, `name`, `cross_kv(context)` and `__call__(x, t, cross_k,
cross_v, cache_k, cache_v, frame_index, cache_len) -> (flow, k_new, v_new)`.
Does not own export (`export/`) or the loop (`generator.py`).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from ..config import ModelConfig
from ..generator import EagerStep
from .manifest import (ENGINE_BACKENDS, EngineError, build_command, engine_cache_dir, find_engines, is_engine_cache,
                       read_manifest, validate_manifest)
from .signature import PRECISIONS, precision_dtype

BACKENDS = ("eager", "compile", "ort", "aoti", "trt")

__all__ = ["BACKENDS", "EngineError", "make_backend", "load_engine", "find_engine", "open_engine"]


def open_engine(engine_dir, manifest: dict, device="cpu", **options):
    """The backend object for an engine folder whose manifest is already checked (no validation)."""
    cfg = ModelConfig.from_dict(manifest["model"]["config"])
    backend = manifest["backend"]
    if backend == "ort":
        from .ort import OrtStep
        return OrtStep(engine_dir, manifest, cfg, device=device, **options)
    if backend == "aoti":
        from .aoti import AotiStep
        return AotiStep(engine_dir, manifest, cfg, device=device, **options)
    if backend == "trt":
        from .trt import load_trt_engine
        return load_trt_engine(engine_dir, manifest, cfg, device=device, **options)
    raise EngineError(f"engine {engine_dir} has unknown backend {backend!r}; known: {ENGINE_BACKENDS}")


def load_engine(path, expect_config: ModelConfig | None = None, expect_hash: str | None = None, *,
                expect_backend: str | None = None, expect_batch: int | None = None,
                expect_precision: str | None = None, expect_checkpoint: str | None = None,
                device="cpu", verify: str = "full", **options):
    """An engine folder as a chunk step, after checking its manifest against the request.

    A missing folder or manifest, an unfinished build, a config / weights-hash / backend / batch /
    precision / shape mismatch, a missing, truncated or corrupt artifact each raise `EngineError`
    with the exact rebuild command. verify: "full" (sha256), "size" or "none"."""
    path = Path(path)
    hint = None
    if expect_backend is not None and expect_config is not None and expect_checkpoint is not None:
        hint = build_command(expect_config.name, expect_checkpoint, expect_backend, expect_precision or "fp32",
                             batch=expect_batch or 1, engine=path)
    manifest = read_manifest(path, hint)
    validate_manifest(path, manifest, expect_config=expect_config, expect_hash=expect_hash,
                      expect_backend=expect_backend, expect_batch=expect_batch, expect_precision=expect_precision,
                      expect_checkpoint=expect_checkpoint, verify=verify)
    return open_engine(path, manifest, device=device, **options)


def find_engine(backend: str, config: ModelConfig, weights_hash: str, *, precision: str | None = None,
                batch: int = 1, engines_dir=None, checkpoint: str = "default", opset: int | None = None) -> Path:
    """The newest finished engine folder for this model (fp32 preferred when precision is None;
    any opset unless `opset` is given) under `engines_dir`, by default the user's engine cache.
    Never the working directory: an engine is code, loaded only from where the user put it."""
    root = Path(engines_dir) if engines_dir is not None else engine_cache_dir()
    seen: list[str] = []
    matches = []
    for d, m in find_engines(root, skipped=seen):
        if m["backend"] != backend:
            continue
        why = ("config differs" if ModelConfig.from_dict(m["model"]["config"]) != config else
               "weights differ" if m["model"]["weights_hash"] != weights_hash else
               "batch differs" if m["batch"] != batch else
               "precision differs" if precision is not None and m["precision"] != precision else
               "opset differs" if opset is not None and m.get("opset") != opset else None)
        seen.append(f"{d.name} ({why})" if why else d.name)
        if why is None:
            matches.append((m["precision"] != "fp32", d))  # fp32 first, then newest (stable sort)
    if matches:
        return sorted(matches, key=lambda pd: pd[0])[0][1]
    cmd = build_command(config.name, checkpoint, backend, precision or "fp32", opset=opset, batch=batch,
                        out=None if is_engine_cache(root) else root)
    local = Path("engines")
    note = (f" ({local.resolve()} is not searched: an engine runs code when loaded, so only a folder you name "
            f"with --engine, or your engine cache, is used)" if local.is_dir() and local.resolve() != root.resolve()
            else "")
    raise EngineError(f"no finished {backend!r} engine in {root} for config {config.name!r}, weights "
                      f"{weights_hash[:12]}..., batch {batch}" + (f", precision {precision}" if precision else "")
                      + (f", opset {opset}" if opset is not None else "")
                      + (f" (found: {', '.join(seen)})" if seen else "") + note + f"; build it: {cmd}")


def _model_of(source):
    from ..model import CausalWanDiT

    if isinstance(source, CausalWanDiT):
        return source, None
    if hasattr(source, "model") and hasattr(source, "weights_hash"):  # registry.LoadedDiT
        return source.model, source
    raise TypeError(f"expected a LoadedDiT (registry.load_dit), a CausalWanDiT or an engine folder; "
                    f"got {type(source).__name__}")


def make_backend(name: str, source, *, engine=None, precision: str | None = None, batch: int = 1,
                 device=None, engines_dir=None, verify: str = "full", opset: int | None = None, **options):
    """A chunk step named `name` serving `source`.

    source: a `LoadedDiT` (registry.load_dit), a `CausalWanDiT`, or an engine folder (str/Path,
    for ort/aoti). For ort/aoti with a loaded model, `engine` (a folder) is validated against
    the model's config and weights hash; without it the newest matching engine under
    `engines_dir` (default: the user's engine cache) is used, or the error names the build command.
    For eager/compile, `precision`/`device` cast a copy of the model (the caller's is untouched).
    `device` defaults to the model's device, for engines too (a model on CUDA gets a CUDA
    engine session), and to the CPU for an engine folder."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {list(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
    if name == "trt":
        from .trt import require_trt
        require_trt()
    if isinstance(source, (str, os.PathLike)):
        if name not in ENGINE_BACKENDS:
            raise ValueError(f"backend {name!r} runs the eager model; give a LoadedDiT, not the folder {source}")
        return load_engine(source, expect_backend=name, expect_precision=precision, device=device or "cpu",
                           verify=verify, **options)
    model, loaded = _model_of(source)
    p = next(model.parameters())
    if device is None:
        device = p.device
    if name in ("eager", "compile"):
        dtype = precision_dtype(precision) if precision else p.dtype
        dev = torch.device(device)
        if (dtype, dev) != (p.dtype, p.device):
            model = copy.deepcopy(model).to(device=dev, dtype=dtype)
        if name == "eager":
            return EagerStep(model)
        from .compiled import CompiledStep
        return CompiledStep(model, **options)
    if loaded is not None:
        weights_hash, checkpoint = loaded.weights_hash, loaded.checkpoint
    else:
        from ..checkpoint import state_dict_hash
        weights_hash, checkpoint = state_dict_hash(model.state_dict()), "PATH"
    if engine is None:
        engine = find_engine(name, model.config, weights_hash, precision=precision, batch=batch,
                             engines_dir=engines_dir, checkpoint=checkpoint, opset=opset)
    return load_engine(engine, model.config, weights_hash, expect_backend=name, expect_batch=batch,
                       expect_precision=precision, expect_checkpoint=checkpoint, device=device,
                       verify=verify, **options)
