"""Packed-sequence (varlen) attention with GQA, forward and backward. Public op: `varlen_attention`.

Contract (FlashAttention varlen): documents are concatenated along the token axis;
`cu_seqlens` (int32, `(num_seqs + 1,)`) holds their boundaries, `cu_seqlens[0] == 0`,
non-decreasing, `cu_seqlens[-1] == total`; `max_seqlen` (a host int) bounds every
document's length. Tokens attend only inside their own document.

Backends (same signature, same results):
- "triton": the kernels in `_attention_triton.py` (default on CUDA when Triton imports);
- "reference": documents grouped by length, one batched SDPA per group
  (`_attention_cpu.py`; default on CPU), equal up to rounding to the per-document
  loop `reference.varlen_attention_reference` (the plain oracle);
- "flash_attn": `flash_attn.flash_attn_varlen_func`, only when asked for with
  `backend="flash_attn"` (CUDA, fp16/bf16, head dim a multiple of 8 up to 256).

Validation is on the host and never syncs with the device: the values of `cu_seqlens`
(start 0, monotonic, end == total, lengths <= max_seqlen) are checked only when
`cu_seqlens` lives on the CPU; on CUDA that check would cost a sync, so it is left to
`check_cu_seqlens` (call it once where batches are built, e.g. in tests or a debug run).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._autocast import autocast_aware
from ._dispatch import HAS_FLASH_ATTN, HAS_TRITON, TRITON_INTERPRET, use_triton
from ._validate import check_same_device, check_tensor
from ._attention_cpu import varlen_attention_batched
from ._ranges import op_range

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256
MAX_TRITON_HEAD_DIM_FP32 = 128  # fp32 tiles of D = 256 overflow an A100's shared memory
_UNBOUNDED = 1 << 30  # equals _attention_triton.UNBOUNDED; kept here so this file imports without Triton


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Check the values of `cu_seqlens` (reads them on the host: one sync on CUDA).

    Raises ValueError unless cu_seqlens[0] == 0, it is non-decreasing, cu_seqlens[-1] == total
    and no document is longer than max_seqlen.
    """
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0]={bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(length < 0 for length in lengths):
        raise ValueError(f"cu_seqlens must be non-decreasing (monotonic), got {bounds[:16]}...")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens[-1] must equal total tokens {total}, got {bounds[-1]}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest document ({max(lengths)})")


def _check_window(window, causal: bool) -> Tuple[int, int]:
    """(left, right) in document positions, unbounded sides as a large int; causal caps right at 0."""
    left, right = -1, -1
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window must be None or a (left, right) pair of ints, got {window!r}")
        for side, value in zip(("left", "right"), window):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"window {side} must be an int (-1 = unbounded), got {type(value).__name__}")
            if value < -1:
                raise ValueError(f"window {side} must be >= -1 (-1 = unbounded), got {value}")
        left, right = window
    left = _UNBOUNDED if left < 0 else left
    right = 0 if causal else (_UNBOUNDED if right < 0 else right)
    return left, right


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale) -> float:
    """Shape/dtype/device checks shared by every backend; returns the softmax scale."""
    check_tensor("q", q, dtypes=KERNEL_DTYPES + (torch.float64,), ndim=3)
    check_tensor("k", k, ndim=3)
    check_tensor("v", v, ndim=3)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (the varlen contract), got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one entry (num_seqs + 1), got an empty tensor")
    check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    total, num_heads, head_dim = q.shape
    if k.shape[0] != total or k.shape[2] != head_dim:
        raise ValueError(f"k must have shape ({total}, Hkv, {head_dim}) to match q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0 or num_heads % k.shape[1] != 0:
        raise ValueError(f"Hq % Hkv must be 0 (GQA): q has {num_heads} heads, k has {k.shape[1]}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be a host int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _pick_backend(backend: Optional[str], q: torch.Tensor, cu_seqlens: torch.Tensor) -> str:
    if backend not in (None, "auto", "triton", "reference", "flash_attn"):
        raise ValueError(f"backend must be one of None, 'auto', 'triton', 'reference', 'flash_attn', got {backend!r}")
    head_dim = q.shape[2]
    if backend == "flash_attn":
        if not HAS_FLASH_ATTN:
            raise RuntimeError("backend='flash_attn' was asked for but flash_attn is not importable")
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"backend='flash_attn' needs CUDA fp16/bf16 q, got {q.dtype} on {q.device}")
        if head_dim % 8 != 0 or head_dim > 256:
            raise ValueError(f"backend='flash_attn' supports head dims that are multiples of 8 up to 256, got {head_dim}")
        return "flash_attn"
    if backend == "reference":
        return "reference"
    if backend == "triton" or use_triton(q, cu_seqlens):
        if backend == "triton" and not HAS_TRITON:
            raise RuntimeError("backend='triton' was asked for but Triton is not importable")
        if not q.is_cuda and not TRITON_INTERPRET:
            raise RuntimeError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")
        if q.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton kernel takes q in float16, bfloat16 or float32, got {q.dtype}")
        limit = MAX_TRITON_HEAD_DIM if q.dtype != torch.float32 else MAX_TRITON_HEAD_DIM_FP32
        if head_dim > limit:
            raise ValueError(f"the Triton kernel supports {q.dtype} head dims up to {limit}, got {head_dim}")
        return "triton"
    return "reference"


class VarlenAttentionFunction(torch.autograd.Function):
    """Triton varlen attention; saves (q, k, v, o, lse) and recomputes P in backward."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, scale: float, left: int, right: int):
        from . import _attention_triton as kernels

        # The kernels take any token/head strides but need a contiguous head dim.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        o, lse = kernels.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, left, right)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.params = (max_seqlen, scale, left, right)
        return o

    @staticmethod
    def backward(ctx, grad_out):
        from . import _attention_triton as kernels

        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq, dk, dv = kernels.varlen_attention_bwd(grad_out, q, k, v, o, lse, cu_seqlens, *ctx.params)
        return dq, dk, dv, None, None, None, None, None


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, scale, window):
    from flash_attn import flash_attn_varlen_func

    window_size = tuple(window) if window is not None else (-1, -1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=window_size,
    )


@op_range("varlen_attention")
@autocast_aware("lower", cast=("q", "k", "v"))
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[tuple] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention over packed documents, differentiable in q, k and v.

    Args:
        q: (total, Hq, D) float16 / bfloat16 / float32 (float64 on the reference backend only).
        k, v: (total, Hkv, D), q's dtype and device; Hq % Hkv == 0 (query head h uses kv head
            h // (Hq // Hkv)).
        cu_seqlens: (num_seqs + 1,) int32 document boundaries, cu_seqlens[-1] == total.
        max_seqlen: host int >= the longest document (sizes the launch grid).
        causal: mask keys after the query (inside each document).
        softmax_scale: defaults to D ** -0.5.
        window: optional (left, right) sliding window: query i sees keys j with
            i - left <= j <= i + right; -1 leaves a side unbounded. Combined with `causal`.
        backend: None/"auto" (Triton on CUDA, else the reference; `force_backend` applies),
            "triton", "reference" or "flash_attn".

    Returns:
        (total, Hq, D) in q's dtype (accumulated in float32).
    """
    scale = _check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    left, right = _check_window(window, bool(causal))
    if cu_seqlens.device.type == "cpu":  # free on the host; on CUDA it would sync (see check_cu_seqlens)
        check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    chosen = _pick_backend(backend, q, cu_seqlens)
    if chosen == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens, max_seqlen, bool(causal), scale, window)
    if chosen == "triton":
        return VarlenAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, scale, left, right)
    return varlen_attention_batched(
        q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=scale, window=window
    )
