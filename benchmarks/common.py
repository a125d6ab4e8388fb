"""Shared benchmark plumbing: timing with medians, machine description, report folders.

Owns: `time_fn` (warm-up reported apart, median/min/max over repeats), `machine_info`, the
report directory naming and atomic JSON writing. Does not own any model or backend.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch

REPORTS = Path(__file__).parent / "reports"


def time_fn(fn, repeats: int = 5, warmup: int = 1) -> dict:
    """Seconds per call: warm-up calls timed apart, then median/min/max over `repeats`."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "warmup": warm,
            "repeats": repeats}


def time_interleaved(fns: dict, repeats: int = 5, warmup: int = 1, block: int = 1) -> dict:
    """Like `time_fn` for several functions, run round-robin so drift (thermal, other load) hits
    all of them alike: a fair side-by-side comparison. `block` > 1 times that many calls in a row
    per turn (repeats turns), so a function's timings are not taken right after another
    runtime's threads were busy (OpenMP workers spin for a while after torch ops)."""
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        out[name] = {"warmup": time.perf_counter() - t0, "times": []}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                out[name]["times"].append(time.perf_counter() - t0)
    for r in out.values():
        ts = r.pop("times")
        r.update(median=statistics.median(ts), min=min(ts), max=max(ts), repeats=repeats * block)
    return out


def onednn_linear(x: torch.Tensor, weight: torch.Tensor):
    """A callable computing x @ weight.T [M, N] (weight [N, K]) as oneDNN runs it on a prepacked
    weight: what AOTInductor's frozen linears call on CPU."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, x.shape[0])
    return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    info = {"host": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def report_dir(name: str | None = None) -> Path:
    stamp = datetime.date.today().isoformat()
    d = REPORTS / (name or f"{stamp}-{socket.gethostname()}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
