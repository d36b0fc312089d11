"""Decode attention over a paged KV cache: one new query token per sequence. Public op: `paged_decode_attention`.

Layout (the rollout engine's KV pool, one per layer):
    k_cache, v_cache: (num_blocks, block_size, Hkv, D); a sequence's positions live in
    the pages listed by its row of `block_tables` (position p is slot p % block_size of
    page block_tables[b, p // block_size]); context_lens[b] keys (the new token's included).

    out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b   over the first context_lens[b] keys of
    sequence b, kv head h // (Hq // Hkv) (GQA).

Backends (same results up to float rounding):
- "triton": split-KV kernel + combine (`_decode_attention_triton.py`), default on CUDA; the
  launch grid depends only on shapes, so it can be CUDA-graph captured;
- "flash_attn": `flash_attn_with_kvcache`, default on CUDA when flash-attn is installed and the
  page size is a multiple of 256 (its paged-KV requirement), fp16/bf16 only;
- "reference": an exact torch gather + softmax in float32 (float64 for float64 inputs), default on CPU.

Validation is on the host; values (context lengths, page ids) are checked only for CPU tensors
(on CUDA that would cost a device sync).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch
from ._dispatch import HAS_FLASH_ATTN, HAS_TRITON, TRITON_INTERPRET, use_triton
from ._validate import check_same_device, check_tensor
from ._ranges import op_range

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = (None, "auto", "triton", "reference", "flash_attn")


def _check(q, k_cache, v_cache, block_tables, context_lens, softmax_scale) -> float:
    check_tensor("q", q, dtypes=KERNEL_DTYPES + (torch.float64,), ndim=3)
    check_tensor("k_cache", k_cache, ndim=4)
    check_tensor("v_cache", v_cache, ndim=4)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32, torch.int64), ndim=2)
    check_tensor("context_lens", context_lens, dtypes=(torch.int32, torch.int64), ndim=1)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    batch, num_heads, head_dim = q.shape
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must have head dim {head_dim} to match q, got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    num_kv_heads = k_cache.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"Hq % Hkv must be 0 (GQA): q has {num_heads} heads, k_cache has {num_kv_heads}")
    if block_tables.shape[0] != batch or context_lens.shape[0] != batch:
        raise ValueError(f"block_tables and context_lens need {batch} rows (q's batch), got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if context_lens.device.type == "cpu" and batch > 0:  # free on the host; a sync on CUDA
        lo, hi = int(context_lens.min()), int(context_lens.max())
        capacity = block_tables.shape[1] * k_cache.shape[1]
        if lo < 1 or hi > capacity:
            raise ValueError(f"context_lens must be in [1, {capacity}] (block_tables width x block_size), "
                             f"got {lo}..{hi}")
        used = torch.arange(block_tables.shape[1]) < ((context_lens[:, None] + k_cache.shape[1] - 1)
                                                      // k_cache.shape[1])
        pages = block_tables[used]
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= k_cache.shape[0]):
            raise ValueError(f"block_tables holds page ids outside [0, {k_cache.shape[0]}) in its used entries")
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _pick(backend, q, k_cache, num_splits) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    flash_ok = (HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                and k_cache.shape[1] % 256 == 0 and q.shape[2] % 8 == 0 and q.shape[2] <= 256)
    if backend == "flash_attn":
        if not flash_ok:
            raise RuntimeError("backend='flash_attn' needs flash_attn installed, CUDA fp16/bf16 q, a page size that "
                               f"is a multiple of 256 and a head dim multiple of 8 <= 256; got {q.dtype} on "
                               f"{q.device}, page {k_cache.shape[1]}, head dim {q.shape[2]}")
        return "flash_attn"
    forced = _dispatch.get_backend()
    if backend == "reference" or (backend in (None, "auto") and forced == "reference"):
        return "reference"
    if backend in (None, "auto") and flash_ok and forced != "triton":
        return "flash_attn"
    if backend == "triton" or use_triton(q, k_cache):
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' was asked for but Triton is not importable")
        if not q.is_cuda and not TRITON_INTERPRET:
            raise RuntimeError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")
        if q.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton kernel takes q in float16, bfloat16 or float32, got {q.dtype}")
        return "triton"
    return "reference"


def default_num_splits(batch: int, num_heads: int, capacity: int) -> int:
    """Splits per (sequence, head): enough programs to fill a GPU (~1024), at least 256 keys per split."""
    want = max(1, -(-1024 // max(1, batch * num_heads)))
    return int(max(1, min(want, -(-capacity // 256), 64)))


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """Exact torch path: gather each sequence's pages, mask past its length, softmax in float32 (float64).

    float64 inputs take an explicit einsum / softmax (the oracle path); other dtypes run SDPA (GQA, a
    key mask) on the gathered float32 keys, the same math with a faster CPU kernel.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pages = block_tables.reshape(-1).long()  # index_select: several times faster than advanced indexing on CPU
    keys = k_cache.index_select(0, pages).view(batch, -1, num_kv_heads, head_dim).to(acc)  # (B, W * page, Hkv, D)
    values = v_cache.index_select(0, pages).view(batch, -1, num_kv_heads, head_dim).to(acc)
    valid = torch.arange(keys.shape[1], device=q.device)[None, :] < context_lens[:, None].long()  # (B, N)
    if acc == torch.float32:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.to(acc)[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=valid[:, None, None, :],
            scale=scale, enable_gqa=True)
        return out[:, :, 0].to(q.dtype)
    group = num_heads // num_kv_heads
    qg = q.to(acc).view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bkgd,bnkd->bkgn", qg, keys) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgn,bnkd->bkgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


@op_range("paged_decode_attention")
def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    num_splits: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged keys/values (no autograd).

    Args:
        q: (B, Hq, D) float16 / bfloat16 / float32 (float64 on the reference backend).
        k_cache, v_cache: (num_blocks, block_size, Hkv, D), q's dtype and device; Hq % Hkv == 0.
        block_tables: (B, W) int32/int64 page ids; entries past a sequence's pages are ignored.
        context_lens: (B,) int32/int64 keys per sequence, in [1, W * block_size].
        softmax_scale: defaults to D ** -0.5.
        num_splits: Triton split-KV factor (default from shapes, see `default_num_splits`).
        backend: None/"auto", "triton", "flash_attn" or "reference".

    Returns:
        (B, Hq, D) in q's dtype.
    """
    scale = _check(q, k_cache, v_cache, block_tables, context_lens, softmax_scale)
    chosen = _pick(backend, q, k_cache, num_splits)
    if chosen == "reference" or q.shape[0] == 0:
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
    if chosen == "flash_attn":
        from flash_attn import flash_attn_with_kvcache

        out = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=context_lens.int(),
                                      block_table=block_tables.int(), softmax_scale=scale, causal=True)
        return out[:, 0]
    from ._decode_attention_triton import paged_decode_attention_triton

    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    splits = num_splits or default_num_splits(q.shape[0], q.shape[1], block_tables.shape[1] * k_cache.shape[1])
    return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, splits)
