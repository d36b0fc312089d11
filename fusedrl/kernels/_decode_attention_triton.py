"""Split-KV decode attention over a paged KV cache: Triton kernels (see `decode_attention.py`).

One query token per sequence. Pass 1 (`_paged_decode_split_kernel`, grid (B, Hq, S)):
program (b, h, s) walks the key positions [s * SPLIT_LEN, min((s + 1) * SPLIT_LEN, ctx_b))
of sequence b in tiles of BLOCK_N positions, each position's page read from the block
table, with an online softmax; it writes its partial output (normalised by its own sum)
and its log-sum-exp (-inf when the split is empty). Pass 2 (`_paged_decode_combine_kernel`,
grid (B, Hq)) merges the S partials with weights exp(lse_s - max lse). The grid depends
only on shapes (B, Hq, S), never on the context lengths, so a launch can be CUDA-graph
captured; the per-sequence loop bounds are read on the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_split_kernel(
    Q, K, V, BLOCK_TABLES, CONTEXT_LENS, O_PART, LSE_PART,
    stride_qb, stride_qh,
    stride_kn, stride_kp, stride_kh,
    stride_vn, stride_vp, stride_vh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    scale, split_len,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    kvh = h // GROUP
    ctx = tl.load(CONTEXT_LENS + b).to(tl.int32)
    start = s * split_len
    end = tl.minimum(start + split_len, ctx)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d, mask=dmask, other=0.0).to(tl.float32) * scale
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        page = tl.load(BLOCK_TABLES + b * stride_btb + pos // PAGE, mask=pmask, other=0).to(tl.int64)
        slot = (pos % PAGE).to(tl.int64)
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(K + page[:, None] * stride_kn + slot[:, None] * stride_kp + kvh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1)
        scores = tl.where(pmask, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        v = tl.load(V + page[:, None] * stride_vn + slot[:, None] * stride_vp + kvh * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[:, None] + tl.sum(p[:, None] * v, axis=0)[None, :]
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(O_PART + b * stride_ob + h * stride_oh + s * stride_os + offs_d[None, :], out, mask=dmask[None, :])
    tl.store(LSE_PART + b * stride_lb + h * stride_lh + s + tl.arange(0, 1), lse)


@triton.jit
def _paged_decode_combine_kernel(
    O_PART, LSE_PART, OUT,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < num_splits
    dmask = offs_d < HEAD_DIM
    lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))
    part = tl.load(O_PART + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                   mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(OUT + b * stride_outb + h * stride_outh + offs_d, out.to(OUT.dtype.element_ty), mask=dmask)


def block_n(page: int) -> int:
    """Key positions per tile: 64, or less for tiny pages (a power of two)."""
    return 64 if page >= 16 else max(16, triton.next_power_of_2(page))


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                                  num_splits: int) -> torch.Tensor:
    """Launch both passes; inputs validated by the caller (head dims contiguous)."""
    batch, num_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    capacity = block_tables.shape[1] * page
    tile = block_n(page)
    split_len = triton.cdiv(triton.cdiv(capacity, num_splits), tile) * tile
    block_d = max(16, triton.next_power_of_2(head_dim))
    o_part = torch.empty(batch, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    _paged_decode_split_kernel[(batch, num_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, o_part, lse_part,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        scale, split_len,
        GROUP=num_heads // num_kv_heads, PAGE=page, HEAD_DIM=head_dim, BLOCK_N=tile, BLOCK_D=block_d,
        num_warps=4,
    )
    _paged_decode_combine_kernel[(batch, num_heads)](
        o_part, lse_part, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        num_splits,
        HEAD_DIM=head_dim, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
        num_warps=4,
    )
    return out
