"""`--backend auto`: run the engine that `python -m export.build --backend auto` chose here.

Owns: `find_auto_engine` (the newest auto-chosen engine folder for a model) and `make_auto` (its
chunk step, named after the candidate that won). The choice itself (build the candidates, time
them on this machine, keep the fastest) is `export/auto.py`'s; its record is the manifest's
`auto` section: every candidate's timing, the winner, and the CPU features it was timed on.
Does not own the backends it opens (`make_backend`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .manifest import EngineError, engine_cache_dir, find_engines, read_manifest


def auto_build_command(config_name: str, checkpoint: str, batch: int = 1, out=None) -> str:
    cmd = "python -m export.build --backend auto" + ("" if checkpoint == "default" else
                                                      f" --config {config_name} --checkpoint {checkpoint}")
    return cmd + (f" --batch {batch}" if batch != 1 else "") + (f" --out {out}" if out is not None else "")


def find_auto_engine(config, weights_hash: str, *, batch: int = 1, engines_dir=None,
                     checkpoint: str = "default") -> Path:
    from ..config import ModelConfig

    root = Path(engines_dir) if engines_dir is not None else engine_cache_dir()
    for d, m in find_engines(root):  # newest first
        if (m.get("auto") and m["batch"] == batch and m["model"]["weights_hash"] == weights_hash
                and ModelConfig.from_dict(m["model"]["config"]) == config):
            return d
    raise EngineError(f"no engine chosen by --backend auto in {root} for config {config.name!r}, weights "
                      f"{weights_hash[:12]}..., batch {batch}; build it (times every candidate on this machine): "
                      f"{auto_build_command(config.name, checkpoint, batch, None if engines_dir is None else root)}")


def make_auto(loaded, engine=None, engines_dir=None, **options):
    """The auto-chosen engine's chunk step for `loaded` (validated like any engine)."""
    from . import make_backend
    from .manifest import host_info

    folder = Path(engine) if engine is not None else find_auto_engine(
        loaded.config, loaded.weights_hash, batch=options.get("batch", 1), engines_dir=engines_dir,
        checkpoint=loaded.checkpoint)
    m = read_manifest(folder)
    auto = m.get("auto")
    if not auto:
        raise EngineError(f"engine {folder} was not chosen by --backend auto (it is a {m['backend']!r} engine): "
                          f"use --backend {m['backend']}, or build one: "
                          f"{auto_build_command(loaded.config.name, loaded.checkpoint)}")
    here = host_info()["cpu"]
    if auto.get("cpu", {}).get("model") not in (None, here):
        warnings.warn(f"engine {folder.name} was chosen by timing on {auto['cpu']['model']}, this is {here}: "
                      f"the fastest candidate may differ here; rebuild with --backend auto --force", stacklevel=2)
    step = make_backend(m["backend"], loaded, engine=folder, **options)
    step.name = f"auto ({auto['chosen']})"
    return step
