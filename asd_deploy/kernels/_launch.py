"""What every kernel file shares: lazy `triton.jit`, launch sizing, the device check.

Owns: `lazy_jit` (a kernel is decorated with it instead of `@triton.jit`, so importing a kernel
file imports only torch; triton is imported, and the kernel jitted, at its first launch, once
for CUDA and once for the interpreter), `device_guard` (launch on the tensors' GPU),
`launch_config` (rows per program and warps from the padded row width), `frames_of` (the
per-frame shape check) and `check_runnable` (a loud error when tensors sit where the kernel
cannot run). Does not own the switch between kernels and references (`__init__.py`) nor any
kernel.

Why lazy: `import asd_deploy.kernels` works on machines without triton and costs nothing where
no kernel runs. The interpreter (CPU tensors, run through numpy) is chosen per launch by the
tensors' device and `TRITON_INTERPRET=1`, never by what the environment said when triton was
imported: no module needs to set that variable at import time.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

MAX_TILE = 8192  # elements per program (rows * padded width): ~32 fp32 registers/thread at 8 warps
MAX_ROWS = 64    # rows per program


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch_config(block: int, n_rows: int, interpreted: bool = False) -> tuple[int, int]:
    """(rows per program, num_warps) for rows padded to `block` lanes: as many rows as fit in
    MAX_TILE (a register budget, so ignored by the interpreter, which has no registers and pays
    ~5 ms per program), at most MAX_ROWS, no more than the (padded) row count. Powers of two
    throughout (`tl.arange` needs them)."""
    cap = MAX_ROWS if interpreted else min(MAX_ROWS, MAX_TILE // block)
    rows = max(1, min(cap, next_power_of_2(n_rows)))
    return rows, (4 if rows * block <= 4096 else 8)


def frames_of(x: torch.Tensor, mod: torch.Tensor, name: str) -> int:
    """F from a per-frame tensor [B, F, D] (or broadcastable), checked against x [B, L, D]."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, D]; got shape {list(x.shape)}")
    B, L, D = x.shape
    if mod.dim() != 3 or mod.shape[0] not in (1, B) or mod.shape[2] not in (1, D) or mod.shape[1] < 1 \
            or L % mod.shape[1]:
        raise ValueError(f"{name} must be [B, F, D] (or broadcast to it) with F dividing L; got "
                         f"{list(mod.shape)} for x {list(x.shape)}")
    return mod.shape[1]


class LazyKernel:
    """A kernel function jitted by triton on first use, once per kind of device it runs on: a
    compiled `JITFunction` for CUDA tensors, an `InterpretedFunction` for CPU tensors (only
    under TRITON_INTERPRET=1, read at launch). Keeping both means a test process that ran the
    interpreter on CPU still launches compiled kernels on CUDA, whatever the environment. The
    function's module must have `from __future__ import annotations` (so `tl.constexpr`
    annotations stay strings until triton reads them); `tl` is bound in that module's globals
    when triton is first imported."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self._jitted = {}        # "cuda" | "interpreter" -> the jitted function
        self.interpreted = None  # whether the last build was the interpreter's
        self.launches = 0        # how many times this kernel was launched (tests spy on it)

    def build(self, device: torch.device | str = "cuda"):
        kind = "cuda" if torch.device(device).type == "cuda" else "interpreter"
        if kind not in self._jitted:
            import triton.language as tl
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction

            self.fn.__globals__.setdefault("tl", tl)
            self._jitted[kind] = InterpretedFunction(self.fn) if kind == "interpreter" else JITFunction(self.fn)
        self.interpreted = kind == "interpreter"
        return self._jitted[kind]

    def launcher(self, device: torch.device):
        """`launcher(device)[grid](...)`: the kernel wrapped by `torch.library.wrap_triton`, so
        torch.compile, torch.export and AOTInductor see it inside the `asd::` operators (a plain
        launch in eager mode); the interpreter's function is launched as it is."""
        jitted = self.build(device)
        self.launches += 1
        if self.interpreted:
            return jitted
        from torch.library import wrap_triton

        return wrap_triton(jitted)


def lazy_jit(fn) -> LazyKernel:
    return LazyKernel(fn)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether `import triton` works (it is imported here, so only call it when a kernel may run)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device, not on its tensors' (a `cuda:1` tensor with
    device 0 current is an illegal address): make the tensors' device current for the launch."""
    if device.type == "cuda" and device.index is not None and torch.cuda.is_initialized() \
            and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_runnable(name: str, **tensors: torch.Tensor) -> torch.device:
    """The common device of `tensors`, after checking kernel `name` can run there. Raises a
    RuntimeError that says what was found and what to do."""
    devices = {k: t.device for k, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise RuntimeError(f"{name}: all tensors must be on one device; got "
                           + ", ".join(f"{k} on {d}" for k, d in devices.items()))
    device = next(iter(devices.values()))
    if not triton_importable():
        raise RuntimeError(f"{name}: the Triton kernel was requested (ASD_KERNELS="
                           f"{os.environ.get('ASD_KERNELS', 'auto')}) but triton is not installed; "
                           "install triton or set ASD_KERNELS=reference")
    if device.type == "cuda":
        return device
    if device.type == "cpu":
        if interpreter_enabled():
            return device
        raise RuntimeError(f"{name}: got CPU tensors; Triton kernels run on CPU tensors only under the "
                           "Triton interpreter: set TRITON_INTERPRET=1 in the environment, or set "
                           "ASD_KERNELS=reference")
    raise RuntimeError(f"{name}: Triton kernels run on CUDA tensors (or CPU tensors under "
                       f"TRITON_INTERPRET=1); got tensors on {device}. Set ASD_KERNELS=reference "
                       "to use the PyTorch reference")
