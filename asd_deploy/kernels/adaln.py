"""Per-frame AdaLN in one pass: LayerNorm (no affine, fp32) then per-frame shift/scale.

    y[b, l] = LN(x[b, l]) * (1 + scale[b, l // HW]) + shift[b, l // HW],  HW = L / F

Owns: `adaln_kernel` (Triton), its launcher `adaln_triton` (the operator `asd::adaln`, whose
body is `adaln_launch`) and the eager `adaln_reference` (same signature, same result). Does not own the choice between them (`asd_deploy.kernels`).

Shapes: x [B, L, D] with L = F * HW frame-major; shift, scale [B, F, D], or anything that
broadcasts to it ([1, F, D], strided slices of the model's [B, F, 6, D] modulation). Statistics,
modulation and output math are fp32; the output has x's dtype. (The eager model rounds the
normalised x to x's dtype before modulating: identical at fp32, within one rounding at bf16.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ._launch import cdiv, check_runnable, device_guard, frames_of, launch_config, lazy_jit, next_power_of_2

if TYPE_CHECKING:
    import triton.language as tl


@lazy_jit
def adaln_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    n_rows, L, HW, D,              # n_rows = B * L; token l is in frame l // HW
    sx_b, sx_l, sx_d,              # x      [B, L, D]
    ssh_b, ssh_f, ssh_d,           # shift  [B, F, D] (stride 0 on broadcast dims)
    ssc_b, ssc_f, ssc_d,           # scale  [B, F, D]
    so_b, so_l,                    # out    [B, L, D], last dim contiguous
    eps,
    BLOCK_D: tl.constexpr,         # next power of two >= D; lanes >= D are masked
    ROWS: tl.constexpr,            # rows (tokens) per program
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)           # [ROWS] flat index b * L + l
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)                                         # offsets may pass 2**31
    b = rows // L
    l = rows % L
    f = l // HW
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]                     # [ROWS, BLOCK_D]

    x = tl.load(x_ptr + (b * sx_b + l * sx_l)[:, None] + cols[None, :] * sx_d,
                mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D                                     # [ROWS]
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D                                # biased, as LayerNorm
    xn = xc * tl.rsqrt(var + eps)[:, None]

    shift = tl.load(shift_ptr + (b * ssh_b + f * ssh_f)[:, None] + cols[None, :] * ssh_d,
                    mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + (b * ssc_b + f * ssc_f)[:, None] + cols[None, :] * ssc_d,
                    mask=mask, other=0.0).to(tl.float32)
    y = xn * (1.0 + scale) + shift
    tl.store(out_ptr + (b * so_b + l * so_l)[:, None] + cols[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> int:
    frames = frames_of(x, shift, "shift")
    if frames_of(x, scale, "scale") != frames:
        raise ValueError(f"shift and scale disagree on frames: {list(shift.shape)} vs {list(scale.shape)}")
    return frames


def adaln_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    frames = _check(x, shift, scale)
    xn = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps).unflatten(1, (frames, -1))
    y = xn * (1 + scale.float()[:, :, None]) + shift.float()[:, :, None]  # [B, F, HW, D]
    return y.flatten(1, 2).to(x.dtype)


def adaln_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The kernel, as the operator `torch.ops.asd.adaln` (registered at first use, `ops.py`)."""
    from .ops import ops

    return ops().adaln(x, shift, scale, float(eps))


def adaln_launch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The operator's body: checks, output allocation, one launch."""
    frames = _check(x, shift, scale)
    device = check_runnable("adaln", x=x, shift=shift, scale=scale)
    B, L, D = x.shape
    shift, scale = shift.expand(B, frames, D), scale.expand(B, frames, D)
    out = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    n_rows = B * L
    if n_rows == 0 or D == 0:
        return out
    block = next_power_of_2(D)
    launch = adaln_kernel.launcher(device)
    rows, warps = launch_config(block, n_rows, adaln_kernel.interpreted)
    with device_guard(device):
        launch[(cdiv(n_rows, rows),)](
            x, shift, scale, out,
            n_rows, L, L // frames, D,
            *x.stride(), *shift.stride(), *scale.stride(), out.stride(0), out.stride(1),
            float(eps),
            BLOCK_D=block, ROWS=rows, num_warps=warps,
        )
    return out
