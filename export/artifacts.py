"""Atomic artifact writes: a file under its final name is always a whole file.

Owns: `write_atomically`. The writer gets a path with the artifact's final basename inside a
private temporary folder (exporters derive side-file names from it, e.g. ONNX external data
`step.onnx.data`), then side files and finally the main file are renamed into place. An
interrupted or failed write leaves nothing under a final name and removes its temporary folder.
Does not own what is written.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(final: Path, write: Callable[[Path], object]) -> list[Path]:
    """Call `write(tmp_path)`; return [final, *side files] once they are renamed into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp.", dir=final.parent))
    try:
        write(tmpdir / final.name)
        if not (tmpdir / final.name).is_file():
            raise RuntimeError(f"writer for {final.name} produced no file")
        side = sorted(p for p in tmpdir.iterdir() if p.name != final.name)
        for p in side:  # side files first: the main file is what a loader opens
            os.replace(p, final.parent / p.name)
        os.replace(tmpdir / final.name, final)
        return [final] + [final.parent / p.name for p in side]
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
