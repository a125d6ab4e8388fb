"""The flow-matching step in one pass: flow -> x0 -> re-noised to the next sigma.

    x_next = (1 - sigma_next) * (x_t - sigma * v) + sigma_next * eps

Owns: `scheduler_update_kernel` (Triton), its launcher `scheduler_update_triton` and the eager
`scheduler_update_reference` (same signature, same result). Does not own the sigmas
(`asd_deploy.schedule`), drawing eps (the loop's seeded generator) nor the kernel/reference switch.

Shapes: x_t, v, eps all of one shape (any rank, any strides); sigma, sigma_next Python numbers or
0-d / one-element tensors. A tensor sigma on x_t's device is read by the kernel (no host sync,
so a CUDA graph can update it in place between replays); a number, or a CPU tensor with CUDA
x_t (read on the host), is a launch constant, baked into a captured graph.
Math in fp32; the output has x_t's dtype and is contiguous.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ._launch import cdiv, check_runnable, launch_config, lazy_jit, next_power_of_2

if TYPE_CHECKING:
    import triton.language as tl

FLAT_WIDTH = 1024  # contiguous inputs are processed as rows of this many elements


@lazy_jit
def scheduler_update_kernel(
    x_ptr, v_ptr, eps_ptr, out_ptr,
    sigma, sigma_next,             # fp32 scalars, or pointers to one element (see SIGMA*_IS_PTR)
    M, N, numel,                   # the update seen as [M, N]; elements with m * N + n >= numel are padding
    sx_m, sx_n,                    # x_t  [M, N]
    sv_m, sv_n,                    # v    [M, N]
    se_m, se_n,                    # eps  [M, N]
    BLOCK_N: tl.constexpr,         # next power of two >= N
    ROWS: tl.constexpr,            # rows per program
    SIGMA_IS_PTR: tl.constexpr,
    SIGMA_NEXT_IS_PTR: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)           # [ROWS]
    cols = tl.arange(0, BLOCK_N)
    flat = rows.to(tl.int64)[:, None] * N + cols[None, :]            # [ROWS, BLOCK_N] logical index
    mask = (rows < M)[:, None] & (cols < N)[None, :] & (flat < numel)
    r = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    if SIGMA_IS_PTR:
        s = tl.load(sigma).to(tl.float32)
    else:
        s = sigma
    if SIGMA_NEXT_IS_PTR:
        s_next = tl.load(sigma_next).to(tl.float32)
    else:
        s_next = sigma_next

    x = tl.load(x_ptr + r * sx_m + c * sx_n, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + r * sv_m + c * sv_n, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(eps_ptr + r * se_m + c * se_n, mask=mask, other=0.0).to(tl.float32)
    x_next = (1.0 - s_next) * (x - s * v) + s_next * e
    tl.store(out_ptr + flat, x_next.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x_t, v, eps):
    if v.shape != x_t.shape or eps.shape != x_t.shape:
        raise ValueError(f"x_t, v and eps must have one shape; got {list(x_t.shape)}, {list(v.shape)}, "
                         f"{list(eps.shape)}")


def _scalar(value, name: str):
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{name} must be a number or a one-element tensor; got shape {list(value.shape)}")
    return value


def scheduler_update_reference(x_t: torch.Tensor, v: torch.Tensor, eps: torch.Tensor, sigma,
                               sigma_next) -> torch.Tensor:
    _check(x_t, v, eps)
    s, s_next = _scalar(sigma, "sigma"), _scalar(sigma_next, "sigma_next")
    if isinstance(s, torch.Tensor):
        s = s.float().reshape(())
    if isinstance(s_next, torch.Tensor):
        s_next = s_next.float().reshape(())
    x0 = x_t.float() - s * v.float()
    return ((1 - s_next) * x0 + s_next * eps.float()).to(x_t.dtype)


def _kernel_scalar(value, device: torch.device, name: str):
    """(kernel argument, is a pointer): a device tensor stays on the device; numbers and CPU
    tensors beside CUDA data become Python floats."""
    value = _scalar(value, name)
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value.reshape(()), True
        if value.device.type != "cpu":
            raise RuntimeError(f"scheduler_update: {name} is on {value.device} but x_t on {device}")
        value = value.item()
    return float(value), False


def scheduler_update_triton(x_t: torch.Tensor, v: torch.Tensor, eps: torch.Tensor, sigma,
                            sigma_next) -> torch.Tensor:
    _check(x_t, v, eps)
    device = check_runnable(scheduler_update_kernel, "scheduler_update", x_t=x_t, v=v, eps=eps)
    s, s_is_ptr = _kernel_scalar(sigma, device, "sigma")
    s_next, s_next_is_ptr = _kernel_scalar(sigma_next, device, "sigma_next")
    out = torch.empty(x_t.shape, dtype=x_t.dtype, device=device)
    numel = x_t.numel()
    if numel == 0:
        return out
    if x_t.is_contiguous() and v.is_contiguous() and eps.is_contiguous():
        n = min(FLAT_WIDTH, next_power_of_2(numel))      # rows of n elements, the last one ragged
        m, strides = cdiv(numel, n), (n, 1) * 3
    else:
        n = x_t.shape[-1] if x_t.dim() else 1               # [M, N] views; reshape copies only if it must
        m = numel // n
        x_t, v, eps = (t.reshape(m, n) for t in (x_t, v, eps))
        strides = (*x_t.stride(), *v.stride(), *eps.stride())
    block = next_power_of_2(n)
    rows, warps = launch_config(block, m, scheduler_update_kernel.interpreted)
    scheduler_update_kernel[(cdiv(m, rows),)](
        x_t, v, eps, out, s, s_next,
        m, n, numel, *strides,
        BLOCK_N=block, ROWS=rows, SIGMA_IS_PTR=s_is_ptr, SIGMA_NEXT_IS_PTR=s_next_is_ptr, num_warps=warps,
    )
    return out
