"""Per-frame gated residual in one pass: `x + gate[b, l // HW] * y`, HW = L / F.

Owns: `gated_residual_kernel` (Triton), its launcher `gated_residual_triton` (the operator
`asd::gated_residual`, whose body is `gated_residual_launch`) and the eager
`gated_residual_reference` (same signature, same result). Does not own the choice between them
(`asd_deploy.kernels`).

Shapes: x, y [B, L, D] with L = F * HW frame-major; gate [B, F, D] or anything that broadcasts
to it (strided slices of the model's [B, F, 6, D] modulation included). Math in fp32; the
output has x's dtype (as the model's `gate(x.float(), y.float(), g).type_as(x)`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ._launch import cdiv, check_runnable, device_guard, frames_of, launch_config, lazy_jit, next_power_of_2

if TYPE_CHECKING:
    import triton.language as tl


@lazy_jit
def gated_residual_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr,
    n_rows, L, HW, D,              # n_rows = B * L; token l is in frame l // HW
    sx_b, sx_l, sx_d,              # x    [B, L, D]
    sy_b, sy_l, sy_d,              # y    [B, L, D]
    sg_b, sg_f, sg_d,              # gate [B, F, D] (stride 0 on broadcast dims)
    so_b, so_l,                    # out  [B, L, D], last dim contiguous
    BLOCK_D: tl.constexpr,         # next power of two >= D; lanes >= D are masked
    ROWS: tl.constexpr,            # rows (tokens) per program
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)           # [ROWS] flat index b * L + l
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    b = rows // L
    l = rows % L
    f = l // HW
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]                     # [ROWS, BLOCK_D]

    x = tl.load(x_ptr + (b * sx_b + l * sx_l)[:, None] + cols[None, :] * sx_d,
                mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + (b * sy_b + l * sy_l)[:, None] + cols[None, :] * sy_d,
                mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + (b * sg_b + f * sg_f)[:, None] + cols[None, :] * sg_d,
                mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (b * so_b + l * so_l)[:, None] + cols[None, :],
             (x + g * y).to(out_ptr.dtype.element_ty), mask=mask)


def _check_y(x: torch.Tensor, y: torch.Tensor):
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {list(x.shape)}; got {list(y.shape)}")


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    frames = frames_of(x, gate, "gate")
    _check_y(x, y)
    out = x.float().unflatten(1, (frames, -1)) + gate.float()[:, :, None] * y.float().unflatten(1, (frames, -1))
    return out.flatten(1, 2).to(x.dtype)


def gated_residual_triton(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The kernel, as the operator `torch.ops.asd.gated_residual` (registered at first use, `ops.py`)."""
    from .ops import ops

    return ops().gated_residual(x, y, gate)


def gated_residual_launch(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The operator's body: checks, output allocation, one launch."""
    frames = frames_of(x, gate, "gate")
    _check_y(x, y)
    device = check_runnable("gated_residual", x=x, y=y, gate=gate)
    B, L, D = x.shape
    gate = gate.expand(B, frames, D)
    out = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    n_rows = B * L
    if n_rows == 0 or D == 0:
        return out
    block = next_power_of_2(D)
    launch = gated_residual_kernel.launcher(device)
    rows, warps = launch_config(block, n_rows, gated_residual_kernel.interpreted)
    with device_guard(device):
        launch[(cdiv(n_rows, rows),)](
            x, y, gate, out,
            n_rows, L, L // frames, D,
            *x.stride(), *y.stride(), *gate.stride(), out.stride(0), out.stride(1),
            BLOCK_D=block, ROWS=rows, num_warps=warps,
        )
    return out
