"""Row-invariant Triton RMSNorm of invariant mode (`invariant.invariant_rms_norm` on CUDA tensors; the
tests call `invariant_rms_norm_triton` on CPU tensors under the interpreter).

Semantics are `invariant._rms_rows`' (HF's RMSNorm): per row, in float32,

    n = (x * rsqrt(mean(x^2) + eps)).to(x.dtype)        y = weight * n   (in promote(weight, x) dtype)

backward (what autograd of that formula does, per row): dn = (dy * weight) rounded to y's then x's
dtype, r = rsqrt(mean(x^2) + eps), dx = r * dn - x * r^3 * sum(dn * x) / H, cast to x's dtype;
dweight = sum over rows of dy * n (a sum over every token: no per-token property, plain torch).

Why a row's bits depend on its own row only, by construction: one program per row (the grid is the
row count, never a kernel argument); the whole row in one BLOCK = next_power_of_2(H) vector with
zeros past H; one `tl.sum` over it, whose reduction tree is set by BLOCK and num_warps, both fixed by
H (a model constant) -- never by the number of rows. No atomics, no second pass. The bits are not
PyTorch's (other rsqrt / sum order), but the path is chosen by device and dtype only.

Tested under TRITON_INTERPRET=1 on the CPU (`tests/invariant/test_triton_rms_norm.py`); the CUDA
bitwise tests (`gpu`) and the speed against the NORM_CHUNK loop are still to be run on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .invariant import TRITON_LINEAR_DTYPES as DTYPES
from .invariant import TRITON_NORM_MAX_WIDTH


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, H, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    """Row program_id(0): y = w * (x * rstd).to(x dtype), rstd = rsqrt(mean(x^2) + eps) stored."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + offs, (w * n).to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_kernel(X, W, DY, RSTD, DX, H, stride_x, stride_dy, stride_dx, BLOCK: tl.constexpr):
    """Row program_id(0): dx = rstd * dn - x * rstd^3 * sum(dn * x) / H, dn = dy * w rounded as autograd."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + offs, mask=ok, other=0.0).to(tl.float32)
    dn = (dy * w).to(DY.dtype.element_ty).to(X.dtype.element_ty).to(tl.float32)
    rstd = tl.load(RSTD + row)
    dx = rstd * dn - x * (rstd * rstd * rstd * tl.sum(dn * x, 0) / H)
    tl.store(DX + row * stride_dx + offs, dx.to(DX.dtype.element_ty), mask=ok)


def _config(width: int) -> dict:
    """BLOCK and num_warps, fixed by the hidden width (a model constant): they set the sum's order."""
    block = triton.next_power_of_2(width)
    return dict(BLOCK=block, num_warps=min(max(block // 512, 1), 16))


def check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    """ValueError naming the argument for inputs the kernels do not take."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: must be a 2-D tensor (rows, H), got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x: the Triton invariant RMSNorm takes float16, bfloat16 or float32, got {x.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.shape != (x.shape[1],):
        raise ValueError(f"weight: must be ({x.shape[1]},), got {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype not in DTYPES or weight.device != x.device:
        raise ValueError(f"weight: must be float16 / bfloat16 / float32 on {x.device}, got {weight.dtype} "
                         f"on {weight.device}")
    if x.shape[1] > TRITON_NORM_MAX_WIDTH:
        raise ValueError(f"x: the Triton invariant RMSNorm takes rows up to {TRITON_NORM_MAX_WIDTH} wide, "
                         f"got {x.shape[1]}")


class _InvariantRMSNorm(torch.autograd.Function):
    """Forward and dx on the row kernels; dweight = sum over rows of dy * n in torch."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rows, width = x.shape
        y = torch.empty(rows, width, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        if rows:
            _rms_fwd_kernel[(rows,)](x, weight, y, rstd, width, x.stride(0), y.stride(0), float(eps),
                                     **_config(width))
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            if x.shape[0]:
                _rms_bwd_kernel[(x.shape[0],)](x, weight, dy, rstd, dx, x.shape[1], x.stride(0), dy.stride(0),
                                               dx.stride(0), **_config(x.shape[1]))
        if ctx.needs_input_grad[1]:
            n = (x.float() * rstd[:, None]).to(x.dtype)  # the forward's n (the same float32 product)
            dw = (dy * n).sum(0).to(weight.dtype)  # a sum over every token: no per-token property
        return dx, dw, None


def invariant_rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of 2-D x on the row kernels (differentiable): (rows, H) in promote(x, weight) dtype,
    row i's bits depending on x[i] and weight only."""
    check_inputs(x, weight)
    return _InvariantRMSNorm.apply(x.contiguous(), weight.contiguous(), eps)
