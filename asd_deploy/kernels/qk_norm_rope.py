"""Wan's q/k path in one pass: RMSNorm over the full dim D, then 3D RoPE per head.

    n = x * rsqrt(mean(x^2 over D) + eps) * weight                  (fp32; D = H * Dh, all heads)
    out[b, l, h, 2i]   = n[.., 2i] * cos[l, i] - n[.., 2i+1] * sin[l, i]
    out[b, l, h, 2i+1] = n[.., 2i] * sin[l, i] + n[.., 2i+1] * cos[l, i]   for i < Dh / 2

Owns: `qk_norm_rope_kernel` (Triton), its launcher `qk_norm_rope_triton` (the operator
`asd::qk_norm_rope`, whose body is `qk_norm_rope_launch`) and the eager `qk_norm_rope_reference`
(same signature, same result). The kernel loads each row once, contiguous (128-bit accesses
when the row is contiguous), and splits even/odd lanes in registers (`tl.split`), storing them
back interleaved (`tl.interleave`). Does not own the RoPE tables (built by
the model: time/height/width parts, offset by the chunk's first frame) nor the choice between
kernel and reference (`asd_deploy.kernels`).

Shapes: x [B, L, D] (the q or k projection); weight [D]; cos, sin [L, Dh/2], shared by batch and
heads. Returns [B, L, H, Dh] in x's dtype, contiguous (so `.flatten(-2)` is a free view), the
layout the attention and the cache take. All math is fp32 with one rounding at the end. (The
eager model rounds to x's dtype after the norm and again after RoPE: identical at fp32.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ._launch import cdiv, check_runnable, device_guard, launch_config, lazy_jit, next_power_of_2

if TYPE_CHECKING:
    import triton.language as tl


@lazy_jit
def qk_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    n_rows, L, D, HALF_DH,         # n_rows = B * L; D = H * Dh elements per row, HALF_DH = Dh / 2
    sx_b, sx_l, sx_d,              # x        [B, L, D]
    sw_d,                          # weight   [D]
    sc_l, sc_i,                    # cos      [L, Dh/2]
    ss_l, ss_i,                    # sin      [L, Dh/2]
    so_row,                        # out      [B*L, H*Dh] contiguous: pair j sits at 2j, 2j+1
    eps,
    BLOCK_P: tl.constexpr,         # next power of two >= D / 2 (pairs); lanes beyond are masked
    ROWS: tl.constexpr,            # rows (tokens) per program
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)           # [ROWS] flat index b * L + l
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    b = rows // L
    l = rows % L
    lanes = tl.arange(0, 2 * BLOCK_P)                                # element index in the row
    lane_ok = lanes < D
    j = tl.arange(0, BLOCK_P)                                        # pair index over all heads
    mask_p = row_ok[:, None] & (j < D // 2)[None, :]                 # [ROWS, BLOCK_P]
    i = j % HALF_DH                                                  # rotary frequency of pair j

    # one contiguous row load (vectorised when sx_d == 1), split into even/odd lanes in registers
    x = tl.load(x_ptr + (b * sx_b + l * sx_l)[:, None] + lanes[None, :] * sx_d,
                mask=row_ok[:, None] & lane_ok[None, :], other=0.0).to(tl.float32)  # [ROWS, 2*BLOCK_P]
    xe, xo = tl.split(tl.reshape(x, (ROWS, BLOCK_P, 2)))            # [ROWS, BLOCK_P] each
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)                 # [ROWS]
    w = tl.load(w_ptr + lanes * sw_d, mask=lane_ok, other=0.0).to(tl.float32)
    we, wo = tl.split(tl.reshape(w, (BLOCK_P, 2)))
    ne = xe * rstd[:, None] * we[None, :]
    no = xo * rstd[:, None] * wo[None, :]

    c = tl.load(cos_ptr + (l * sc_l)[:, None] + i[None, :] * sc_i, mask=mask_p, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + (l * ss_l)[:, None] + i[None, :] * ss_i, mask=mask_p, other=0.0).to(tl.float32)
    y = tl.interleave(ne * c - no * s, ne * s + no * c)              # [ROWS, 2*BLOCK_P]: 2j, 2j+1
    tl.store(out_ptr + (rows * so_row)[:, None] + lanes[None, :], y.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & lane_ok[None, :])


def _check(x, weight, cos, sin, num_heads) -> int:
    """Head dim Dh after checking every shape against x [B, L, D]."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, D]; got shape {list(x.shape)}")
    B, L, D = x.shape
    if num_heads < 1 or D % num_heads or (D // num_heads) % 2:
        raise ValueError(f"D = {D} must split into num_heads = {num_heads} heads of an even head dim "
                         "(RoPE rotates pairs)")
    head_dim = D // num_heads
    if weight.shape != (D,):
        raise ValueError(f"weight must be [D] = [{D}]; got {list(weight.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (L, head_dim // 2):
            raise ValueError(f"{name} must be [L, head_dim/2] = [{L}, {head_dim // 2}]; got {list(t.shape)}")
    return head_dim


def qk_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           num_heads: int, eps: float = 1e-6) -> torch.Tensor:
    head_dim = _check(x, weight, cos, sin, num_heads)
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    ne, no = n.unflatten(-1, (num_heads, head_dim // 2, 2)).unbind(-1)  # [B, L, H, Dh/2] each
    c, s = cos.float()[None, :, None], sin.float()[None, :, None]
    return torch.stack([ne * c - no * s, ne * s + no * c], dim=-1).flatten(-2).to(x.dtype)


def qk_norm_rope_triton(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        num_heads: int, eps: float = 1e-6) -> torch.Tensor:
    """The kernel, as the operator `torch.ops.asd.qk_norm_rope` (registered at first use, `ops.py`)."""
    from .ops import ops

    return ops().qk_norm_rope(x, weight, cos, sin, int(num_heads), float(eps))


def qk_norm_rope_launch(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        num_heads: int, eps: float) -> torch.Tensor:
    """The operator's body: checks, output allocation, one launch."""
    head_dim = _check(x, weight, cos, sin, num_heads)
    device = check_runnable("qk_norm_rope", x=x, weight=weight, cos=cos, sin=sin)
    B, L, D = x.shape
    out = torch.empty((B, L, num_heads, head_dim), dtype=x.dtype, device=x.device)
    n_rows = B * L
    if n_rows == 0:
        return out
    block = next_power_of_2(D // 2)
    launch = qk_norm_rope_kernel.launcher(device)
    rows, warps = launch_config(2 * block, n_rows, qk_norm_rope_kernel.interpreted)  # rows of 2*block lanes
    with device_guard(device):
        launch[(cdiv(n_rows, rows),)](
            x, weight, cos, sin, out,
            n_rows, L, D, head_dim // 2,
            *x.stride(), weight.stride(0), *cos.stride(), *sin.stride(), D,
            float(eps),
            BLOCK_P=block, ROWS=rows, num_warps=warps,
        )
    return out
