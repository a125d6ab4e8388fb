"""Wan's q/k path in one pass: RMSNorm over the full dim D, then 3D RoPE per head.

    n = x * rsqrt(mean(x^2 over D) + eps) * weight                  (fp32; D = H * Dh, all heads)
    out[b, l, h, 2i]   = n[.., 2i] * cos[l, i] - n[.., 2i+1] * sin[l, i]
    out[b, l, h, 2i+1] = n[.., 2i] * sin[l, i] + n[.., 2i+1] * cos[l, i]   for i < Dh / 2

Owns: `qk_norm_rope_kernel` (Triton), its launcher `qk_norm_rope_triton` and the eager
`qk_norm_rope_reference` (same signature, same result). Does not own the RoPE tables (built by
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

from ._launch import cdiv, check_runnable, launch_config, lazy_jit, next_power_of_2

if TYPE_CHECKING:
    import triton.language as tl


@lazy_jit
def qk_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    n_rows, L, HALF_D, HALF_DH,    # n_rows = B * L; HALF_D = D / 2 pairs per row, HALF_DH = Dh / 2
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
    j = tl.arange(0, BLOCK_P)                                        # pair index over all heads
    pair_ok = j < HALF_D
    mask = row_ok[:, None] & pair_ok[None, :]                        # [ROWS, BLOCK_P]
    i = j % HALF_DH                                                  # rotary frequency of pair j

    x_row = x_ptr + (b * sx_b + l * sx_l)[:, None]
    xe = tl.load(x_row + (2 * j)[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_row + (2 * j + 1)[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xe * xe + xo * xo, axis=1) / (2 * HALF_D) + eps)  # [ROWS]
    we = tl.load(w_ptr + 2 * j * sw_d, mask=pair_ok, other=0.0).to(tl.float32)
    wo = tl.load(w_ptr + (2 * j + 1) * sw_d, mask=pair_ok, other=0.0).to(tl.float32)
    ne = xe * rstd[:, None] * we[None, :]
    no = xo * rstd[:, None] * wo[None, :]

    c = tl.load(cos_ptr + (l * sc_l)[:, None] + i[None, :] * sc_i, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + (l * ss_l)[:, None] + i[None, :] * ss_i, mask=mask, other=0.0).to(tl.float32)
    out_row = out_ptr + (rows * so_row)[:, None]
    tl.store(out_row + (2 * j)[None, :], (ne * c - no * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + (2 * j + 1)[None, :], (ne * s + no * c).to(out_ptr.dtype.element_ty), mask=mask)


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
    head_dim = _check(x, weight, cos, sin, num_heads)
    check_runnable(qk_norm_rope_kernel, "qk_norm_rope", x=x, weight=weight, cos=cos, sin=sin)
    B, L, D = x.shape
    out = torch.empty((B, L, num_heads, head_dim), dtype=x.dtype, device=x.device)
    n_rows = B * L
    if n_rows == 0:
        return out
    block = next_power_of_2(D // 2)
    # two [ROWS, block] halves (even and odd lanes) per row
    rows, warps = launch_config(2 * block, n_rows, qk_norm_rope_kernel.interpreted)
    qk_norm_rope_kernel[(cdiv(n_rows, rows),)](
        x, weight, cos, sin, out,
        n_rows, L, D // 2, head_dim // 2,
        *x.stride(), weight.stride(0), *cos.stride(), *sin.stride(), D,
        float(eps),
        BLOCK_P=block, ROWS=rows, num_warps=warps,
    )
    return out
