"""Triton kernels for packed-sequence (varlen) flash attention, forward and backward.

For every document d = [cu_seqlens[s], cu_seqlens[s+1]) and query head h (kv head
g = h // (Hq / Hkv)), with positions i, j local to the document:

    S[i, j] = scale * q[i, h] . k[j, g]            visible iff  j - i <= right_eff, i - j <= left_eff
    P       = softmax_j(S) over visible j,          O[i, h] = sum_j P[i, j] v[j, g]
    LSE[i]  = log2 sum_j exp2(S[i, j] * log2(e))    (kept in base-2 units, float32)

right_eff = 0 when causal (else the window's right bound, "unbounded" = a large int),
left_eff  = the window's left bound (or unbounded). Every valid row sees at least itself.

Backward (FlashAttention-2): Delta[i] = rowsum(dO[i] * O[i]);  dP = dO V^T;
dS = P * (dP - Delta);  dV = P^T dO;  dK = scale * dS^T Q;  dQ = scale * dS K.
Two passes and no atomics (deterministic): one program per (key block, kv head, document)
accumulates dK/dV in registers, looping over the query heads of its GQA group and over
the query blocks that can see it; one program per (query block, query head, document)
accumulates dQ over the key blocks it sees.

Shapes: q/o/dq (total, Hq, D); k/v/dk/dv (total, Hkv, D), last dim contiguous;
cu_seqlens int32 (num_seqs + 1,); lse/delta float32 (Hq, total). D is padded to a power
of two (>= 16) with masks. Grid: (num_seqs * heads, blocks over max_seqlen): the axis
that can grow past 65535 goes on dim 0; blocks past a document's end exit at once.
Each program splits its loop into masked edge segments and an unmasked middle segment
(`_segments`), so only diagonal / window / tail blocks pay for the mask.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
UNBOUNDED = 1 << 30  # a window bound larger than any document
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _segments(b0, BLOCK_B: tl.constexpr, seqlen, reach_lo, reach_hi, STEP: tl.constexpr):
    """Loop bounds over the other axis for the rows [b0, b0 + BLOCK_B) of this axis.

    Row r needs [r - reach_lo, r + reach_hi] of the other axis. Returns
    (lo, mid_lo, mid_hi, hi): [lo, mid_lo) and [mid_hi, hi) need masks, [mid_lo, mid_hi)
    is visible to every row (and inside the document), all STEP-aligned except hi.
    """
    b1 = b0 + BLOCK_B - 1
    lo = tl.maximum(b0 - reach_lo, 0) // STEP * STEP
    hi = tl.minimum(b1 + reach_hi + 1, seqlen)
    full_lo = tl.maximum(b1 - reach_lo, 0)
    full_hi = tl.minimum(b0 + reach_hi + 1, seqlen)
    mid_lo = tl.minimum(tl.maximum((full_lo + STEP - 1) // STEP * STEP, lo), hi)
    mid_hi = tl.minimum(tl.maximum(full_hi // STEP * STEP, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _visible(offs_m, offs_n, seqlen, left, right):
    """(BM, BN) mask: query offs_m sees key offs_n (document-local positions)."""
    diff = offs_n[None, :] - offs_m[:, None]
    inside = (offs_m[:, None] < seqlen) & (offs_n[None, :] < seqlen)
    return inside & (diff <= right) & (diff >= -left)


@triton.jit
def _visible_t(offs_m, offs_n, seqlen, left, right):
    """(BN, BM) mask, the transpose of `_visible`: key offs_n is seen by query offs_m."""
    diff = offs_n[:, None] - offs_m[None, :]
    inside = (offs_n[:, None] < seqlen) & (offs_m[None, :] < seqlen)
    return inside & (diff <= right) & (diff >= -left)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b with float32 accumulation. Triton 3.6's interpreter gets bf16 x bf16 dots wrong,
    so there the (already rounded) operands are widened to float32: bf16 products are exact
    in float32, so this matches the GPU's tensor-core result up to summation order."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _fwd_block(acc, m_i, l_i, start_n, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n0, d_mask,
               seqlen, left, right, qk_scale, MASK: tl.constexpr, PRECISION: tl.constexpr,
               INTERPRET: tl.constexpr):
    """One key block of the online softmax: rescale the running (acc, max, sum) and add it."""
    offs_n = start_n + offs_n0
    kv_mask = (offs_n < seqlen)[:, None] & d_mask[None, :]
    k = tl.load(k_ptrs + offs_n[:, None].to(tl.int64) * stride_kt, mask=kv_mask, other=0.0)  # (BN, BD)
    s = _dot(q, tl.trans(k), PRECISION, INTERPRET) * qk_scale  # (BM, BN), log2 units
    if MASK:
        s = tl.where(_visible(offs_m, offs_n, seqlen, left, right), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs + offs_n[:, None].to(tl.int64) * stride_vt, mask=kv_mask, other=0.0)  # (BN, BD)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, INTERPRET)
    return acc, m_new, l_i


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n0, d_mask,
               lo, hi, seqlen, left, right, qk_scale,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    # Triton 3.6's interpreter cannot take tensor loop bounds with NumPy >= 2.4 (its scalars
    # are 1-element arrays); a while loop runs there, the pipelined for loop on the GPU.
    if INTERPRET:
        start_n = lo
        while start_n < hi:
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, start_n, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                                       offs_n0, d_mask, seqlen, left, right, qk_scale, MASK, PRECISION, INTERPRET)
            start_n += BLOCK_N
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, start_n, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                                       offs_n0, d_mask, seqlen, left, right, qk_scale, MASK, PRECISION, INTERPRET)
    return acc, m_i, l_i


@triton.jit
def _program_slot(CU_SEQLENS, num_heads):
    """(head, block, start, seqlen) of this program in the grid (num_seqs * num_heads, blocks)."""
    # 32-bit div/mod (a 64-bit one is a subroutine call that spills registers), then int64
    # before any stride arithmetic. Reverse block order: the last blocks do the most work.
    pid = tl.program_id(0)
    seq = (pid // num_heads).to(tl.int64)
    head = (pid % num_heads).to(tl.int64)
    block = tl.num_programs(1) - 1 - tl.program_id(1)
    start = tl.load(CU_SEQLENS + seq).to(tl.int64)  # global token offset: int64 for the strides
    seqlen = tl.load(CU_SEQLENS + seq + 1) - tl.load(CU_SEQLENS + seq)  # positions inside a document: int32
    return head, block, start, seqlen


@triton.jit
def _varlen_attention_fwd_kernel(
    Q, K, V,  # (total, Hq, D), (total, Hkv, D), (total, Hkv, D)
    O,  # (total, Hq, D) output
    LSE,  # (Hq, total) float32 output, base-2 log-sum-exp
    CU_SEQLENS,  # (num_seqs + 1,) int32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total, num_heads, head_dim, left, right, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, INTERPRET: tl.constexpr,
):
    head, m_block, start, seqlen = _program_slot(CU_SEQLENS, num_heads)
    kv_head = head // GROUP
    if m_block * BLOCK_M < seqlen:
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        row_mask = (offs_m < seqlen)[:, None] & d_mask[None, :]
        q_ptrs = Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_mask, other=0.0)  # (BM, BD)
        k_ptrs = K + start * stride_kt + kv_head * stride_kh + offs_d[None, :]
        v_ptrs = V + start * stride_vt + kv_head * stride_vh + offs_d[None, :]
        # Finite start for the running max: a fully masked block row then gives p = 0, not NaN.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        lo, mid_lo, mid_hi, hi = _segments(m_block * BLOCK_M, BLOCK_M, seqlen, left, right, BLOCK_N)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n0,
                                   d_mask, lo, mid_lo, seqlen, left, right, qk_scale, BLOCK_N, True, PRECISION, INTERPRET)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n0,
                                   d_mask, mid_lo, mid_hi, seqlen, left, right, qk_scale, BLOCK_N, False, PRECISION, INTERPRET)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n0,
                                   d_mask, mid_hi, hi, seqlen, left, right, qk_scale, BLOCK_N, True, PRECISION, INTERPRET)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # only rows past the document end can have l = 0
        o = acc / l_safe[:, None]
        o_ptrs = O + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_mask)
        tl.store(LSE + head * total + start + offs_m, m_i + tl.math.log2(l_safe), mask=offs_m < seqlen)


@triton.jit
def _varlen_attention_bwd_delta_kernel(
    O, DO,  # (total, Hq, D) each
    DELTA,  # (Hq, total) float32 output: rowsum(dO * O)
    stride_ot, stride_oh, stride_dot, stride_doh, total, head_dim,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < total)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + offs_t[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + offs_t[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * total + offs_t, delta, mask=offs_t < total)


@triton.jit
def _dkdv_block(dk, dv, start_m, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                offs_n, d_mask, seqlen, left, right, qk_scale,
                BLOCK_M: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
                INTERPRET: tl.constexpr):
    """One query block's contribution to this key block's dK (unscaled) and dV."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen
    q = tl.load(q_ptrs + offs_m[:, None].to(tl.int64) * stride_qt, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    do = tl.load(do_ptrs + offs_m[:, None].to(tl.int64) * stride_dot, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    lse = tl.load(lse_ptrs + offs_m, mask=row_ok, other=0.0)  # (BM,)
    delta = tl.load(delta_ptrs + offs_m, mask=row_ok, other=0.0)  # (BM,)
    s_t = _dot(k, tl.trans(q), PRECISION, INTERPRET) * qk_scale  # (BN, BM)
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASK:
        p_t = tl.where(_visible_t(offs_m, offs_n, seqlen, left, right), p_t, 0.0)
    return _fa2_dkdv(dk, dv, p_t, q, v, do, delta, PRECISION, INTERPRET)


@triton.jit
def _fa2_dkdv(dk, dv, p_t, q, v, do, delta, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """FlashAttention-2's dK (unscaled) / dV update from one query block's transposed probabilities
    p_t (BN, BM): dV += P^T dO;  dS^T = P^T * (V dO^T - Delta);  dK += dS^T Q."""
    dv += _dot(p_t.to(do.dtype), do, PRECISION, INTERPRET)
    dp_t = _dot(v, tl.trans(do), PRECISION, INTERPRET)  # (BN, BM)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, PRECISION, INTERPRET)
    return dk, dv


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                offs_n, d_mask, lo, hi, seqlen, left, right, qk_scale,
                BLOCK_M: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:  # see _fwd_inner
        start_m = lo
        while start_m < hi:
            dk, dv = _dkdv_block(dk, dv, start_m, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt,
                                 stride_dot, offs_n, d_mask, seqlen, left, right, qk_scale, BLOCK_M, MASK, PRECISION, INTERPRET)
            start_m += BLOCK_M
    else:
        for start_m in range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, start_m, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt,
                                 stride_dot, offs_n, d_mask, seqlen, left, right, qk_scale, BLOCK_M, MASK, PRECISION, INTERPRET)
    return dk, dv


@triton.jit
def _varlen_attention_bwd_dkdv_kernel(
    Q, K, V, DO,  # (total, Hq, D), (total, Hkv, D), (total, Hkv, D), (total, Hq, D)
    LSE, DELTA,  # (Hq, total) float32
    DK, DV,  # (total, Hkv, D) outputs
    CU_SEQLENS,  # (num_seqs + 1,) int32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total, num_kv_heads, head_dim, left, right, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, INTERPRET: tl.constexpr,
):
    kv_head, n_block, start, seqlen = _program_slot(CU_SEQLENS, num_kv_heads)
    if n_block * BLOCK_N < seqlen:
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        kv_mask = (offs_n < seqlen)[:, None] & d_mask[None, :]
        k = tl.load(K + (start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(V + (start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # (BN, BD)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # Queries i see key j iff j - right <= i <= j + left: the mirrored reach.
        lo, mid_lo, mid_hi, hi = _segments(n_block * BLOCK_N, BLOCK_N, seqlen, right, left, BLOCK_M)
        # The whole GQA group in this program: dK/dV sums over its query heads without races.
        for g in range(GROUP):
            head = kv_head * GROUP + g
            q_ptrs = Q + start * stride_qt + head * stride_qh + offs_d[None, :]
            do_ptrs = DO + start * stride_dot + head * stride_doh + offs_d[None, :]
            lse_ptrs = LSE + head * total + start
            delta_ptrs = DELTA + head * total + start
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                                 offs_n, d_mask, lo, mid_lo, seqlen, left, right, qk_scale,
                                 BLOCK_M, True, PRECISION, INTERPRET)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                                 offs_n, d_mask, mid_lo, mid_hi, seqlen, left, right, qk_scale,
                                 BLOCK_M, False, PRECISION, INTERPRET)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                                 offs_n, d_mask, mid_hi, hi, seqlen, left, right, qk_scale,
                                 BLOCK_M, True, PRECISION, INTERPRET)
        dk_ptrs = DK + (start + offs_n)[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :]
        dv_ptrs = DV + (start + offs_n)[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :]
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block(dq, start_n, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask,
              seqlen, left, right, qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
              INTERPRET: tl.constexpr):
    """One key block's contribution to this query block's dQ (unscaled)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n < seqlen)[:, None] & d_mask[None, :]
    k = tl.load(k_ptrs + offs_n[:, None].to(tl.int64) * stride_kt, mask=kv_mask, other=0.0)  # (BN, BD)
    v = tl.load(v_ptrs + offs_n[:, None].to(tl.int64) * stride_vt, mask=kv_mask, other=0.0)  # (BN, BD)
    s = _dot(q, tl.trans(k), PRECISION, INTERPRET) * qk_scale  # (BM, BN)
    p = tl.math.exp2(s - lse[:, None])
    if MASK:
        p = tl.where(_visible(offs_m, offs_n, seqlen, left, right), p, 0.0)
    dp = _dot(do, tl.trans(v), PRECISION, INTERPRET)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PRECISION, INTERPRET)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask,
              lo, hi, seqlen, left, right, qk_scale,
              BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:  # see _fwd_inner
        start_n = lo
        while start_n < hi:
            dq = _dq_block(dq, start_n, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask,
                           seqlen, left, right, qk_scale, BLOCK_N, MASK, PRECISION, INTERPRET)
            start_n += BLOCK_N
    else:
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_block(dq, start_n, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask,
                           seqlen, left, right, qk_scale, BLOCK_N, MASK, PRECISION, INTERPRET)
    return dq


@triton.jit
def _varlen_attention_bwd_dq_kernel(
    Q, K, V, DO,  # (total, Hq, D), (total, Hkv, D), (total, Hkv, D), (total, Hq, D)
    LSE, DELTA,  # (Hq, total) float32
    DQ,  # (total, Hq, D) output
    CU_SEQLENS,  # (num_seqs + 1,) int32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total, num_heads, head_dim, left, right, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, INTERPRET: tl.constexpr,
):
    head, m_block, start, seqlen = _program_slot(CU_SEQLENS, num_heads)
    kv_head = head // GROUP
    if m_block * BLOCK_M < seqlen:
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        row_ok = offs_m < seqlen
        row_mask = row_ok[:, None] & d_mask[None, :]
        q = tl.load(Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=row_mask, other=0.0)  # (BM, BD)
        do = tl.load(DO + (start + offs_m)[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                     mask=row_mask, other=0.0)  # (BM, BD)
        lse = tl.load(LSE + head * total + start + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + head * total + start + offs_m, mask=row_ok, other=0.0)
        k_ptrs = K + start * stride_kt + kv_head * stride_kh + offs_d[None, :]
        v_ptrs = V + start * stride_vt + kv_head * stride_vh + offs_d[None, :]
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        lo, mid_lo, mid_hi, hi = _segments(m_block * BLOCK_M, BLOCK_M, seqlen, left, right, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask,
                       lo, mid_lo, seqlen, left, right, qk_scale, BLOCK_N, True, PRECISION, INTERPRET)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask,
                       mid_lo, mid_hi, seqlen, left, right, qk_scale, BLOCK_N, False, PRECISION, INTERPRET)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, d_mask,
                       mid_hi, hi, seqlen, left, right, qk_scale, BLOCK_N, True, PRECISION, INTERPRET)
        dq_ptrs = DQ + (start + offs_m)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :]
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


# ----------------------------------------------------------------------------- host side

def _configs(block_d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes, warps and stages of every pass, chosen here and nowhere else.

    (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass. GPU values are the tiles that
    ptxas (sm_90, Triton 3.6) compiles with the fewest register spills among the
    FlashAttention-2 / Triton-tutorial shapes tried (forward 128 x 64; dK/dV a key tile
    swept by query blocks; dQ 128 queries over 32 keys); D = 256 and float32 inputs (exact
    fp32 products, a correctness path) get small tiles to fit shared memory.
    Not yet timed on a GPU. The interpreter gets small, unequal blocks so CPU tests stay
    fast and still cross block edges.
    """
    if device.type != "cuda" or _INTERPRET:
        return dict(fwd=(32, 16, 1, 1), dkdv=(16, 32, 1, 1), dq=(32, 16, 1, 1), delta=64)
    if block_d <= 64 and dtype != torch.float32:
        return dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 2), dq=(128, 32, 8, 3), delta=64)
    if block_d <= 128 and dtype != torch.float32:
        return dict(fwd=(128, 64, 8, 3), dkdv=(64, 32, 4, 2), dq=(128, 32, 8, 3), delta=32)
    if dtype == torch.float32:
        return dict(fwd=(64, 32, 4, 1), dkdv=(32, 32, 4, 1), dq=(32, 32, 4, 1), delta=16)
    return dict(fwd=(64, 32, 4, 2), dkdv=(32, 32, 4, 2), dq=(64, 32, 8, 2), delta=16)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _blocks(max_seqlen: int, block: int) -> int:
    """Blocks over the longest document: grid dim 1, which CUDA caps at 65535."""
    count = triton.cdiv(max_seqlen, block)
    if count > 65535:
        raise ValueError(f"max_seqlen={max_seqlen} needs {count} blocks of {block}; at most 65535 fit the grid")
    return count


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs: three TF32 products (about fp32 accuracy, still on tensor cores);
    # 16-bit inputs ignore the setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen: int, scale: float, left: int, right: int):
    """Launch the forward. Returns (o (total, Hq, D) in q's dtype, lse (Hq, total) float32, base 2)."""
    total, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    num_seqs = cu_seqlens.numel() - 1
    o = torch.empty_like(q)
    lse = torch.empty(num_heads, total, device=q.device, dtype=torch.float32)
    block_d = _block_d(head_dim)
    block_m, block_n, warps, stages = _configs(block_d, q.dtype, q.device)["fwd"]
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return o.zero_(), lse.zero_()
    grid = (num_seqs * num_heads, _blocks(max_seqlen, block_m))
    _varlen_attention_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        total, num_heads, head_dim, left, right, scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype), GROUP=group, INTERPRET=_INTERPRET,
        num_warps=warps, num_stages=stages,
    )
    return o, lse


def varlen_attention_bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen: int, scale: float, left: int, right: int):
    """Launch delta, dK/dV and dQ passes. Returns (dq, dk, dv) in the inputs' dtypes."""
    total, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    num_seqs = cu_seqlens.numel() - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _block_d(head_dim)
    cfg = _configs(block_d, q.dtype, q.device)
    delta = torch.empty_like(lse)
    _varlen_attention_bwd_delta_kernel[(triton.cdiv(total, cfg["delta"]), num_heads)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), total, head_dim,
        BLOCK_T=cfg["delta"], BLOCK_D=block_d,
    )
    precision = _precision(q.dtype)
    block_m, block_n, warps, stages = cfg["dkdv"]
    _varlen_attention_bwd_dkdv_kernel[(num_seqs * num_kv_heads, _blocks(max_seqlen, block_n))](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        total, num_kv_heads, head_dim, left, right, scale * LOG2E, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, GROUP=group, INTERPRET=_INTERPRET,
        num_warps=warps, num_stages=stages,
    )
    block_m, block_n, warps, stages = cfg["dq"]
    _varlen_attention_bwd_dq_kernel[(num_seqs * num_heads, _blocks(max_seqlen, block_m))](
        q, k, v, do, lse, delta, dq, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1),
        total, num_heads, head_dim, left, right, scale * LOG2E, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, GROUP=group, INTERPRET=_INTERPRET,
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv
