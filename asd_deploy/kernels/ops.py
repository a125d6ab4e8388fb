"""The kernels as PyTorch operators: `torch.ops.asd.adaln`, `.gated_residual`, `.qk_norm_rope`.

Owns: their registration with `torch.library.triton_op` (torch >= 2.6), which makes each kernel
an operator that torch.compile, torch.export, AOTInductor and CUDA-graph capture include: a
compiled graph calls the Triton kernel (Inductor sees it through `wrap_triton`) instead of
breaking at an opaque Python call. Their fake (meta) implementations are their own bodies run on
fake tensors, as `triton_op` registers them. Does not own the kernels, the launch code (each
kernel file's `*_launch`) nor the switch (`__init__.py`).

Registered at first use (`ops()`), not at import: registration imports triton, which the package
must not need where no kernel runs. This module keeps real (not string) annotations: the
operators' schemas are inferred from them.
"""
import threading

import torch

from ._launch import triton_importable

_lock = threading.Lock()
_registered = False


def ops():
    """`torch.ops.asd`, with the three kernels registered (once, thread-safe)."""
    global _registered
    if not _registered:
        with _lock:
            if not _registered:
                _register()
                _registered = True
    return torch.ops.asd


def _register():
    if not triton_importable():
        raise RuntimeError("a Triton kernel was requested (ASD_KERNELS) but triton is not installed; "
                           "install triton or set ASD_KERNELS=reference")
    from torch.library import triton_op

    from .adaln import adaln_launch
    from .gated_residual import gated_residual_launch
    from .qk_norm_rope import qk_norm_rope_launch

    def adaln(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return adaln_launch(x, shift, scale, eps)

    def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_residual_launch(x, y, gate)

    def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     num_heads: int, eps: float) -> torch.Tensor:
        return qk_norm_rope_launch(x, weight, cos, sin, num_heads, eps)

    for fn in (adaln, gated_residual, qk_norm_rope):
        triton_op(f"asd::{fn.__name__}", fn, mutates_args=())
