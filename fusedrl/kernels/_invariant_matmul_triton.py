"""Batch-invariant Triton matmul of invariant mode: `y = x @ W^T (+ bias)` in one launch for all rows
(`invariant._tile_linear` on CUDA tensors; the tests call `invariant_linear_triton` on CPU tensors).

    x (M, K), W (N, K), bias (N,) or None  ->  y (M, N) in x's dtype
    backward: dx = dy @ W (this kernel again, the reduction over N); dW = dy^T @ x, dbias = dy.sum(0)

Why a row's output bits depend only on its own row of x and on W (and bias) -- by construction, not
by measurement:

- One program per output tile. Program (i, j) computes y[i*BM:(i+1)*BM, j*BN:(j+1)*BN] completely:
  no split-K, no stream-K, no atomics, no second pass. Each output element is written by exactly one
  program.
- One reduction order. The program walks K in steps of BLOCK_K from 0 upwards, accumulating
  `tl.dot` of the (BM, BK) x (BK, BN) blocks into a float32 accumulator; a K tail loads zeros past K
  (adding exact zeros keeps the order). The steps and their order depend on K only.
- Fixed tiles and instructions. BLOCK_M / BLOCK_N / BLOCK_K, num_warps and num_stages are fixed per
  dtype (`_config`), never autotuned and never chosen by M, so every call of a model compiles to one
  kernel whose instruction sequence per output element is the same. Rows past M load zeros and are
  never stored; in a tile matmul an output row depends on its own input row only, so a row's values
  do not depend on which rows share its tile or on its position in the tile (every row of a tile goes
  through the same MMA / FMA instructions).
- M is `do_not_specialize`d: Triton would otherwise compile a separate kernel for M == 1 (and use
  divisibility-by-16 hints), i.e. decode could run other code than training. Strides and pointer
  alignment are still specialised (they are model constants for contiguous inputs; alignment changes
  load widths, not the float ops). M only changes how many programs run (the grid), and the grouped
  program order (GROUP_M) only changes which tile runs when, not the math.
- Bias is added to the float32 accumulator after the K loop, then the sum is rounded once to the
  output dtype. cuBLAS's addmm with a float32 compute type does the same in principle, but this
  kernel is not claimed (nor needed) to match `F.linear`'s bits: its K blocking and MMA order differ.
  One run uses one path, and invariance is the property.
- float32 inputs use `input_precision="ieee"` (no TF32), to stay as exact as `F.linear` in float32
  with TF32 off (PyTorch's default for matmuls); on a GPU that is FMA, not tensor cores, hence slower.

The gradients: dx rows must be invariant too (a token's gradient w.r.t. its hidden state), so dx =
dy @ W is this same kernel with W read as a (N, K) "B" operand (reduction over N in fixed BLOCK_K
steps). dW = dy^T @ x and dbias = dy.sum(0) are sums over every token of the call: no per-token
property to keep, so they are plain torch (cuBLAS may split them by M; that changes their bits, not
any token's).

Tested: under TRITON_INTERPRET=1 on the CPU (accuracy against float64, bitwise M / offset /
neighbour invariance of y and dx; `tests/invariant/test_triton_matmul.py`), and compiled ahead of time
for sm_90 / sm_80 (`tests/kernels/test_invariant_matmul_compile.py`). Not yet run on a GPU: the
CUDA bitwise tests (marked `gpu`) and the speed against the per-tile `F.linear` path are pending.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._attention_triton import _INTERPRET, _dot
from .invariant import TRITON_LINEAR_DTYPES as DTYPES
GROUP_M = 8  # grouped program order (L2 reuse of W); changes which tile runs when, never the math


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    A, B, BIAS, Y,  # A (M, K) rows, B read as (K, N) through its strides, BIAS (N,), Y (M, N) out
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Y[m, n] = sum_k A[m, k] B[k, n] (+ BIAS[n]): one program per (BLOCK_M, BLOCK_N) tile of Y, the
    K loop ascending in BLOCK_K steps, float32 accumulation, one rounding at the store."""
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak  # (BM, BK)
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn  # (BK, BN)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(a, b, PRECISION, INTERPRET)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """(tile row, tile column) of program `pid` in grouped order: GROUP tile rows sweep each column
    band together (W stays in L2). A bijection onto the tiles: it sets the schedule, not the math."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    rows = tl.minimum(tiles_m - first_m, GROUP)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


# ----------------------------------------------------------------------------- host side

def _config(dtype: torch.dtype) -> dict:
    """Tiles and launch settings, fixed per dtype: never tuned per input, never chosen by M.

    16-bit: 128 x 128 output tiles over 64-wide K steps, 8 warps, 3 stages (96 KiB of shared memory);
    float32 (ieee FMA, no tensor cores): 64 x 64 over 32, 4 warps, 3 stages. Conventional picks, not
    yet timed on a GPU; changing them changes the bits (never the invariance). A 128-row tile wastes
    work on decode's few rows, but decode is bound by reading W, which the tile does once per column.
    """
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """ValueError naming the argument for inputs the kernel does not take (instead of a Triton error)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: must be a 2-D tensor (M, K), got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight: must be (N, {x.shape[1]}) for x {tuple(x.shape)}, got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x: the Triton invariant matmul takes float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight: must be on x's device {x.device}, got {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: must be ({weight.shape[0]},), got {tuple(getattr(bias, 'shape', ()))}")
        if not bias.is_floating_point() or bias.device != x.device:
            raise ValueError(f"bias: must be a floating tensor on {x.device}, got {bias.dtype} on {bias.device}")


def _matmul(a: torch.Tensor, b_kn: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """a (M, K) @ b_kn (K, N) (+ bias) in a's dtype; b_kn may be a transposed view (strides only)."""
    m, k = a.shape
    n = b_kn.shape[1]
    y = torch.empty(m, n, device=a.device, dtype=a.dtype)
    if m == 0 or n == 0:
        return y
    if k == 0:  # an empty sum: the bias (or zeros), as F.linear
        return y.copy_(bias.expand(m, n)) if bias is not None else y.zero_()
    cfg = _config(a.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _matmul_kernel[grid](
        a, b_kn, bias if bias is not None else a, y, m, n, k,
        a.stride(0), a.stride(1), b_kn.stride(0), b_kn.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP=GROUP_M, PRECISION="ieee", INTERPRET=_INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


class _InvariantLinear(torch.autograd.Function):
    """y = x @ W^T + b on the kernel; dx on the kernel too (per-row invariant), dW / dbias in torch."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _matmul(x, weight.t(), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _matmul(dy, weight, None)  # (M, N) @ (N, K): the reduction over N, fixed order
        if ctx.needs_input_grad[1]:
            dw = dy.t().mm(x)  # a sum over all tokens: no per-token property (plain torch)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy.sum(0).to(ctx.bias_dtype)  # a sum over all tokens too
        return dx, dw, db


def invariant_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                            ) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for 2-D x on the batch-invariant kernel (differentiable).

    Args:
        x: (M, K) float16 / bfloat16 / float32; weight: (N, K) of x's dtype; bias: (N,) or None.
    Returns:
        (M, N) in x's dtype; row i's bits depend on x[i], weight and bias only.
    """
    check_inputs(x, weight, bias)
    return _InvariantLinear.apply(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous())
