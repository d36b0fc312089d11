"""Triton kernels of invariant-mode attention (`invariant_attention.attend_planned` on CUDA tensors).

Semantics are `attend_planned`'s: sequence s has queries q[cu_q[s]:cu_q[s+1]] at absolute positions
starts[s], starts[s]+1, ... and keys / values k[cu_k[s]:cu_k[s+1]] at positions 0, 1, ...; causal
(the query at position p sees keys 0..p); query head h reads kv head h // (Hq / Hkv).

Why a token's bits do not depend on the layout -- by construction, not by measurement:

- Fixed tile shapes. BLOCK_M = Q_TILE = 32 query rows by BLOCK_N = KV_BLOCK = 64 keys, head dim
  padded to BLOCK_D, num_warps / num_stages chosen once per (BLOCK_D, dtype) in `_configs`: no
  autotuning, and one compiled kernel per (head dim, dtype) serves training, chunked prefill and
  decode alike.
- Position-aligned tiles. A forward / dq program owns one (query tile, query head): the rows at
  absolute positions [t * 32, t * 32 + 32) of one sequence, so the token at position p always sits in
  row p % 32. Rows outside the sequence's query range load zeros and are never stored; every matmul
  output row depends on its own query row only, so a row's values do not depend on the other rows.
- One block order. Key blocks of exactly 64 from position 0, ascending, up to
  min(t * 32 + 32, key count) -- a bound set by the tile and the key count, not by which rows are
  valid. A row's instruction sequence is therefore the same whether its tile holds 1 query (decode)
  or 32 (training). Blocks past a row's own position are fully masked for it: in the online softmax
  m stays m, alpha = exp2(m - m) = 1 and p = 0, so the state is bitwise unchanged -- decode (key
  count p + 1) and training (key count = sequence length) stop after different numbers of blocks
  and still give the same bits. Every row sees key 0 in block 0, so no row meets -inf - -inf.
- No cross-program reduction. The backward is FlashAttention-2 without atomics: Delta =
  rowsum(dO * O) per row (in the dq program), dq per (query tile, head) over the same blocks in the
  same order; dk / dv per (key block, kv head) of one sequence, summing the GQA group's query heads in
  ascending order and, for each, the sequence's query tiles that see the block in ascending tile
  index. A key's gradient is summed in an order set by its own sequence only.
- Scalars that change with the layout (row counts, offsets) are never kernel arguments: a program
  reads its sequence's bounds from int32 metadata (`KernelLayout`), so Triton's specialisation on
  integer arguments (== 1, divisible by 16) cannot pick a different kernel per pack. Pointer
  alignment is still specialised; it changes load widths, not the float ops.

What is not claimed: equality with the PyTorch path (`_block_rows`: other exp / scale arithmetic),
or across GPUs / Triton versions. GPU compilation, the CUDA bitwise tests (marked `gpu`) and the
speed are still to be run on a GPU; the CPU tests run these kernels under TRITON_INTERPRET=1.

Shapes: q / o / dq (Nq, Hq, D); k / v / dk / dv (Nk, Hkv, D), last dim contiguous; lse / delta
float32 (Nq, Hq), log-sum-exp in base 2.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._attention_triton import LOG2E, _INTERPRET, _block_d, _dot, _fa2_dkdv, _precision
from .invariant_attention import (KV_BLOCK, Q_TILE, TRITON_DTYPES, TRITON_MAX_HEAD_DIM, TRITON_MAX_HEAD_DIM_FP32,
                                  AttentionPlan, KernelLayout)


@triton.jit
def _query_tile(tile, TILE_SEQ, TILE_INDEX, CU_Q, CU_K, STARTS, BLOCK_M: tl.constexpr):
    """(positions, valid rows, query rows, first key row, key count, end of the block loop) of
    query tile `tile`. The loop ends at min(the tile's last position + 1, key count): it depends on
    the tile and the key count only, not on which of its rows are queries."""
    seq = tl.load(TILE_SEQ + tile)
    pos0 = tl.load(TILE_INDEX + tile) * BLOCK_M
    pos = pos0 + tl.arange(0, BLOCK_M)  # absolute positions
    valid, rows = _tile_rows(pos, seq, CU_Q, STARTS)
    k0 = tl.load(CU_K + seq).to(tl.int64)
    key_count = tl.load(CU_K + seq + 1) - tl.load(CU_K + seq)
    return pos, valid, rows, k0, key_count, tl.minimum(pos0 + BLOCK_M, key_count)


@triton.jit
def _tile_rows(pos, seq, CU_Q, STARTS):
    """(valid, row) of the tile rows at positions `pos` of sequence `seq`; invalid rows point at row 0."""
    q0 = tl.load(CU_Q + seq)
    start = tl.load(STARTS + seq)
    valid = (pos >= start) & (pos < start + tl.load(CU_Q + seq + 1) - q0)
    rows = tl.where(valid, q0 + pos - start, 0).to(tl.int64)
    return valid, rows


@triton.jit
def _visible(pos, offs_n, key_count):
    """(BM, BN): the query at position pos sees key offs_n (causal, inside the sequence)."""
    return (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] < key_count)


@triton.jit
def _visible_t(pos, offs_n, key_count):
    """(BN, BM), the transpose of `_visible` (built directly: no transpose of a boolean tile)."""
    return (offs_n[:, None] <= pos[None, :]) & (offs_n[:, None] < key_count)


@triton.jit
def _load_rows(ptr, rows, stride_t, valid, d_mask):
    """(len(rows), BLOCK_D) rows of a (N, H, D) tensor (head already in ptr), zeros where not valid."""
    return tl.load(ptr + rows[:, None] * stride_t, mask=valid[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _key_rows(k0, offs_n, key_ok, KEY_ROWS, PAGED: tl.constexpr):
    """Rows of K / V holding the keys at positions offs_n of a sequence whose keys start at entry k0:
    k0 + offs_n, or, PAGED, KEY_ROWS[k0 + offs_n] (the engine's cache slots: read in place)."""
    if PAGED:
        return tl.load(KEY_ROWS + k0 + offs_n, mask=key_ok, other=0).to(tl.int64)
    return k0 + offs_n.to(tl.int64)


@triton.jit
def _fwd_block(acc, m_i, l_i, start_n, q, pos, k_ptr, v_ptr, k0, KEY_ROWS, stride_kt, stride_vt, key_count, d_mask,
               qk_scale, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PRECISION: tl.constexpr,
               INTERPRET: tl.constexpr):
    """Fold keys [start_n, start_n + BLOCK_N) into the online softmax (acc, max, sum) of the tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < key_count
    rows = _key_rows(k0, offs_n, key_ok, KEY_ROWS, PAGED)
    k = _load_rows(k_ptr, rows, stride_kt, key_ok, d_mask)  # (BN, BD)
    v = _load_rows(v_ptr, rows, stride_vt, key_ok, d_mask)
    s = _dot(q, tl.trans(k), PRECISION, INTERPRET) * qk_scale  # (BM, BN), log2 units
    s = tl.where(_visible(pos, offs_n, key_count), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, INTERPRET)
    return acc, m_new, l_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE,  # (Nq, Hq, D), (Nk, Hkv, D) x 2, (Nq, Hq, D) out, (Nq, Hq) float32 out
    TILE_SEQ, TILE_INDEX, CU_Q, CU_K, STARTS,  # int32 KernelLayout
    KEY_ROWS,  # PAGED: the K / V row of each key entry (else unused)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_heads, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    PAGED: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program per (query tile, query head): grid (tiles, Hq)."""
    head = tl.program_id(1).to(tl.int64)
    pos, valid, rows, k0, key_count, hi = _query_tile(tl.program_id(0), TILE_SEQ, TILE_INDEX, CU_Q, CU_K, STARTS,
                                                      BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = _load_rows(Q + head * stride_qh + offs_d[None, :], rows, stride_qt, valid, d_mask)  # (BM, BD)
    k_ptr = K + (head // GROUP) * stride_kh + offs_d[None, :]
    v_ptr = V + (head // GROUP) * stride_vh + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot take tensor bounds in range() (see _attention_triton)
        start_n = hi * 0
        while start_n < hi:
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, start_n, q, pos, k_ptr, v_ptr, k0, KEY_ROWS, stride_kt,
                                       stride_vt, key_count, d_mask, qk_scale, BLOCK_N, PAGED, PRECISION, INTERPRET)
            start_n += BLOCK_N
    else:
        for start_n in range(0, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, start_n, q, pos, k_ptr, v_ptr, k0, KEY_ROWS, stride_kt,
                                       stride_vt, key_count, d_mask, qk_scale, BLOCK_N, PAGED, PRECISION, INTERPRET)
    o = acc / l_i[:, None]  # l_i >= 1 for every row: key 0 is visible to all
    o_ptrs = O + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=valid[:, None] & d_mask[None, :])
    tl.store(LSE + rows * num_heads + head, m_i + tl.math.log2(l_i), mask=valid)


@triton.jit
def _dq_block(dq, start_n, q, do, lse, delta, pos, valid, k_ptr, v_ptr, stride_kt, stride_vt, key_count, d_mask,
              qk_scale, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N)'s contribution to the tile's dq (unscaled)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < key_count
    k = _load_rows(k_ptr, offs_n.to(tl.int64), stride_kt, key_ok, d_mask)
    v = _load_rows(v_ptr, offs_n.to(tl.int64), stride_vt, key_ok, d_mask)
    s = _dot(q, tl.trans(k), PRECISION, INTERPRET) * qk_scale
    p = tl.where(_visible(pos, offs_n, key_count) & valid[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), PRECISION, INTERPRET)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PRECISION, INTERPRET)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, O, DO, LSE,  # LSE (Nq, Hq) float32
    DQ, DELTA,  # (Nq, Hq, D) out, (Nq, Hq) float32 out: rowsum(dO * O), read by the dk / dv pass
    TILE_SEQ, TILE_INDEX, CU_Q, CU_K, STARTS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    num_heads, head_dim, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program per (query tile, query head), the forward's blocks in the forward's order."""
    head = tl.program_id(1).to(tl.int64)
    pos, valid, rows, k0, key_count, hi = _query_tile(tl.program_id(0), TILE_SEQ, TILE_INDEX, CU_Q, CU_K, STARTS,
                                                      BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = _load_rows(Q + head * stride_qh + offs_d[None, :], rows, stride_qt, valid, d_mask)
    do = _load_rows(DO + head * stride_doh + offs_d[None, :], rows, stride_dot, valid, d_mask)
    o = _load_rows(O + head * stride_oh + offs_d[None, :], rows, stride_ot, valid, d_mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + rows * num_heads + head, delta, mask=valid)
    lse = tl.load(LSE + rows * num_heads + head, mask=valid, other=0.0)
    k_ptr = K + k0 * stride_kt + (head // GROUP) * stride_kh + offs_d[None, :]
    v_ptr = V + k0 * stride_vt + (head // GROUP) * stride_vh + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if INTERPRET:
        start_n = hi * 0
        while start_n < hi:
            dq = _dq_block(dq, start_n, q, do, lse, delta, pos, valid, k_ptr, v_ptr, stride_kt, stride_vt,
                           key_count, d_mask, qk_scale, BLOCK_N, PRECISION, INTERPRET)
            start_n += BLOCK_N
    else:
        for start_n in range(0, hi, BLOCK_N):
            dq = _dq_block(dq, start_n, q, do, lse, delta, pos, valid, k_ptr, v_ptr, stride_kt, stride_vt,
                           key_count, d_mask, qk_scale, BLOCK_N, PRECISION, INTERPRET)
    dq_ptrs = DQ + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=valid[:, None] & d_mask[None, :])


@triton.jit
def _dkdv_tile(dk, dv, t, seq, k, v, offs_n, key_count, q_ptr, do_ptr, LSE, DELTA, head, num_heads,
               stride_qt, stride_dot, CU_Q, STARTS, d_mask, qk_scale,
               BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """Query tile t's (one head) contribution to the key block's dk (unscaled) and dv."""
    pos = t * BLOCK_M + tl.arange(0, BLOCK_M)
    valid, rows = _tile_rows(pos, seq, CU_Q, STARTS)
    q = _load_rows(q_ptr, rows, stride_qt, valid, d_mask)
    do = _load_rows(do_ptr, rows, stride_dot, valid, d_mask)
    lse = tl.load(LSE + rows * num_heads + head, mask=valid, other=0.0)
    delta = tl.load(DELTA + rows * num_heads + head, mask=valid, other=0.0)
    s_t = _dot(k, tl.trans(q), PRECISION, INTERPRET) * qk_scale  # (BN, BM)
    seen = _visible_t(pos, offs_n, key_count) & valid[None, :]
    p_t = tl.where(seen, tl.math.exp2(s_t - lse[None, :]), 0.0)
    return _fa2_dkdv(dk, dv, p_t, q, v, do, delta, PRECISION, INTERPRET)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA,
    DK, DV,  # (Nk, Hkv, D) out
    BLOCK_SEQ, BLOCK_INDEX, CU_Q, CU_K, STARTS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_heads, head_dim, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program per (key block, kv head): grid (key blocks, Hkv). Sums over the GQA group's heads
    (ascending) and, for each, the sequence's query tiles that see the block (ascending)."""
    kv_head = tl.program_id(1).to(tl.int64)
    seq = tl.load(BLOCK_SEQ + tl.program_id(0))
    n0 = tl.load(BLOCK_INDEX + tl.program_id(0)) * BLOCK_N  # the block's first key position
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k0 = tl.load(CU_K + seq).to(tl.int64)
    key_count = tl.load(CU_K + seq + 1) - tl.load(CU_K + seq)
    start = tl.load(STARTS + seq)
    end = start + tl.load(CU_Q + seq + 1) - tl.load(CU_Q + seq)  # one past the last query's position
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    key_ok = offs_n < key_count
    k = _load_rows(K + k0 * stride_kt + kv_head * stride_kh + offs_d[None, :], offs_n.to(tl.int64), stride_kt,
                   key_ok, d_mask)
    v = _load_rows(V + k0 * stride_vt + kv_head * stride_vh + offs_d[None, :], offs_n.to(tl.int64), stride_vt,
                   key_ok, d_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    t_lo = tl.maximum(start, n0) // BLOCK_M  # the first tile with a query at or after the block
    t_hi = (end - 1) // BLOCK_M + 1
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_ptr = Q + head * stride_qh + offs_d[None, :]
        do_ptr = DO + head * stride_doh + offs_d[None, :]
        if INTERPRET:
            t = t_lo
            while t < t_hi:
                dk, dv = _dkdv_tile(dk, dv, t, seq, k, v, offs_n, key_count, q_ptr, do_ptr, LSE, DELTA, head,
                                    num_heads, stride_qt, stride_dot, CU_Q, STARTS, d_mask, qk_scale,
                                    BLOCK_M, PRECISION, INTERPRET)
                t += 1
        else:
            for t in range(t_lo, t_hi):
                dk, dv = _dkdv_tile(dk, dv, t, seq, k, v, offs_n, key_count, q_ptr, do_ptr, LSE, DELTA, head,
                                    num_heads, stride_qt, stride_dot, CU_Q, STARTS, d_mask, qk_scale,
                                    BLOCK_M, PRECISION, INTERPRET)
    store = key_ok[:, None] & d_mask[None, :]
    dk_ptrs = DK + (k0 + offs_n)[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + (k0 + offs_n)[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=store)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store)


# ----------------------------------------------------------------------------- host side

def _configs(block_d: int, dtype: torch.dtype) -> dict:
    """(num_warps, num_stages) per pass, fixed per (BLOCK_D, dtype): never tuned per input.

    Tiles are always BLOCK_M = Q_TILE x BLOCK_N = KV_BLOCK. Conservative picks for a 32 x 64 tile,
    not yet compiled or timed on a GPU; changing them changes the bits (never the invariance).
    """
    if block_d <= 64:
        return dict(fwd=(4, 2), dq=(4, 2), dkdv=(4, 2))
    if dtype == torch.float32:
        return dict(fwd=(4, 1), dq=(4, 1), dkdv=(8, 1))
    return dict(fwd=(4, 2), dq=(4, 2), dkdv=(8, 1))


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError, naming the argument, for inputs the kernels do not take (shapes are checked by
    `attend_planned`)."""
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"q: the Triton invariant attention takes float16, bfloat16 or float32, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if not x.is_floating_point():
            raise ValueError(f"{name}: must be a floating tensor, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: must be on q's device {q.device}, got {x.device}")
    limit = TRITON_MAX_HEAD_DIM_FP32 if q.dtype == torch.float32 else TRITON_MAX_HEAD_DIM
    if q.shape[2] > limit:
        raise ValueError(f"head_dim: the Triton invariant attention takes {q.dtype} head dims up to {limit}, "
                         f"got {q.shape[2]}")


def _launch_args(block_d: int, dtype: torch.dtype, group: int) -> dict:
    return dict(BLOCK_M=Q_TILE, BLOCK_N=KV_BLOCK, BLOCK_D=block_d, GROUP=group, PRECISION=_precision(dtype),
                INTERPRET=_INTERPRET)


def attention_fwd(q, k, v, layout: KernelLayout, scale: float,
                  key_rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o (Nq, Hq, D) in q's dtype, lse (Nq, Hq) float32, base 2). `key_rows` (the plan's): key entry
    j of the layout is row key_rows[j] of k / v, read in place."""
    nq, num_heads, head_dim = q.shape
    o = torch.zeros_like(q)
    lse = torch.zeros(nq, num_heads, device=q.device, dtype=torch.float32)
    tiles = layout.tile_seq.numel()
    if tiles == 0:
        return o, lse
    block_d = _block_d(head_dim)
    warps, stages = _configs(block_d, q.dtype)["fwd"]
    _attention_fwd_kernel[(tiles, num_heads)](
        q, k, v, o, lse, layout.tile_seq, layout.tile_index, layout.cu_q, layout.cu_k, layout.starts,
        layout.cu_k if key_rows is None else key_rows,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        num_heads, head_dim, scale * LOG2E, **_launch_args(block_d, q.dtype, num_heads // k.shape[1]),
        PAGED=key_rows is not None, num_warps=warps, num_stages=stages,
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, layout: KernelLayout, scale: float):
    """(dq, dk, dv) in the inputs' dtypes; key rows outside every sequence get 0."""
    nq, num_heads, head_dim = q.shape
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    tiles = layout.tile_seq.numel()
    if tiles == 0:
        return dq, dk, dv
    block_d = _block_d(head_dim)
    cfg = _configs(block_d, q.dtype)
    args = _launch_args(block_d, q.dtype, num_heads // k.shape[1])
    delta = torch.empty_like(lse)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    warps, stages = cfg["dq"]
    _attention_bwd_dq_kernel[(tiles, num_heads)](
        q, k, v, o, do, lse, dq, delta, layout.tile_seq, layout.tile_index, layout.cu_q, layout.cu_k, layout.starts,
        *strides, o.stride(0), o.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        num_heads, head_dim, scale * LOG2E, scale, **args, num_warps=warps, num_stages=stages,
    )
    warps, stages = cfg["dkdv"]
    _attention_bwd_dkdv_kernel[(layout.block_seq.numel(), k.shape[1])](
        q, k, v, do, lse, delta, dk, dv, layout.block_seq, layout.block_index, layout.cu_q, layout.cu_k,
        layout.starts, *strides, do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        num_heads, head_dim, scale * LOG2E, scale, **args, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


def _contiguous_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class InvariantAttentionFunction(torch.autograd.Function):
    """`attend_planned` on the Triton kernels; saves (q, k, v, o, lse) and recomputes P in backward."""

    @staticmethod
    def forward(ctx, q, k, v, layout: KernelLayout, scale: float):
        q, k, v = (_contiguous_last(x) for x in (q, k, v))
        o, lse = attention_fwd(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale = layout, scale
        return o

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(_contiguous_last(grad_out), q, k, v, o, lse, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None


def attend_planned_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
                          scale: float) -> torch.Tensor:
    """`attend_planned` on the kernels (arguments already checked there); k, v cast to q's dtype.

    A plan with `key_rows` (the engine's paged cache) is read in place by the forward when no
    gradient is needed (the loads fetch the same values as a gather first would: same bits); with
    a gradient the keys are gathered first and the autograd path runs.
    """
    check_inputs(q, k, v)
    k, v = (x if x.dtype == q.dtype else x.to(q.dtype) for x in (k, v))
    if plan.key_rows is not None:
        if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
            q, k, v = (_contiguous_last(x) for x in (q, k, v))
            return attention_fwd(q, k, v, plan.kernel, float(scale), plan.key_rows)[0]
        k, v = (x.index_select(0, plan.key_rows[:plan.num_keys]) for x in (k, v))
    return InvariantAttentionFunction.apply(q, k, v, plan.kernel, float(scale))
