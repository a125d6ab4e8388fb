"""Fused Triton kernels for the causal DiT's memory-bound ops, and the one switch that picks them.

Owns: the switch (`ASD_KERNELS` = `triton` | `reference` | `auto`, default `auto`) and one
dispatch function per kernel, each with its kernel's signature:

    adaln(x [B, L, D], shift [B, F, D], scale [B, F, D], eps=1e-6) -> [B, L, D]
    gated_residual(x [B, L, D], y [B, L, D], gate [B, F, D]) -> [B, L, D]
    qk_norm_rope(x [B, L, D], weight [D], cos [L, Dh/2], sin [L, Dh/2], num_heads, eps=1e-6)
        -> [B, L, H, Dh]

(L = F * HW tokens in frame-major order; per-frame tensors apply to every token of their frame.)
Each kernel lives in its own file with its launcher `<name>_triton` (the PyTorch operator
`torch.ops.asd.<name>`, registered in `ops.py` so torch.compile, AOTInductor and CUDA graphs
include it) and eager `<name>_reference`. Does not own: wiring into the model (the model calls
these functions, or not).

`auto` runs a kernel when the tensor is on CUDA and triton imports; `triton` always runs the
kernel (CPU tensors need `TRITON_INTERPRET=1`: the interpreter; a device the kernel cannot run
on is a RuntimeError saying so); `reference` never does. In eager mode the switch is read at
every call (tests change it at run time); under torch.compile it is read once, when the graph
is traced, and CPU tensors take the reference there (Inductor fuses it; the interpreter cannot
be traced). Importing this package does not import triton: the operators are registered at
first eager use or by `prepare(device)` (what the compiled backend calls before compiling), and
a kernel is jitted at its first launch.

The submodule names equal the dispatch functions' (`kernels.adaln` is the function); reach a
kernel file's contents with `from asd_deploy.kernels.adaln import adaln_reference`.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ._launch import triton_importable
from .adaln import adaln_reference, adaln_triton
from .gated_residual import gated_residual_reference, gated_residual_triton
from .qk_norm_rope import qk_norm_rope_reference, qk_norm_rope_triton

ENV_VAR = "ASD_KERNELS"
MODES = ("triton", "reference", "auto")
TRITON_PRESENT = importlib.util.find_spec("triton") is not None  # found, not imported

__all__ = ["ENV_VAR", "MODES", "kernel_mode", "use_triton", "prepare", "adaln", "gated_residual", "qk_norm_rope"]


def kernel_mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not one of {', '.join(MODES)}")
    return mode


def use_triton(device: torch.device | str) -> bool:
    """Whether the dispatch functions run the Triton kernel for tensors on `device`.

    Under torch.compile this is traced once, as plain Python (Dynamo refuses importlib): the
    kernels on CUDA unless ASD_KERNELS=reference and triton is absent, the reference on any other
    device (Inductor fuses it; the interpreter cannot be traced). The operators must be registered
    before tracing (`prepare`), since registration cannot be traced."""
    device = torch.device(device)
    mode = kernel_mode()
    if torch.compiler.is_compiling():
        return device.type == "cuda" and mode != "reference" and TRITON_PRESENT
    if mode != "auto":
        return mode == "triton"
    return device.type == "cuda" and triton_importable()


def prepare(device: torch.device | str) -> bool:
    """Register the `torch.ops.asd` operators now if the kernels will run on `device` (the
    compiled and exported backends call this before torch.compile / torch.export); returns
    whether they will."""
    use = use_triton(device)
    if use:
        from .ops import ops

        ops()
    return use


def adaln(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) (no affine, fp32) * (1 + scale[b, frame]) + shift[b, frame]."""
    return (adaln_triton if use_triton(x.device) else adaln_reference)(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate[b, frame] * y (fp32 math, x's dtype)."""
    return (gated_residual_triton if use_triton(x.device) else gated_residual_reference)(x, y, gate)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over all of D with `weight`, then RoPE on adjacent pairs per head -> [B, L, H, Dh]."""
    fn = qk_norm_rope_triton if use_triton(x.device) else qk_norm_rope_reference
    return fn(x, weight, cos, sin, num_heads, eps)
