"""Triton distillation divergence: per-row divergence and d(loss)/d(logits) from two logits chunks.

    zs = (h_S W_S^T + b_S) / tau,  zt = (h_T W_T^T + b_T) / tau      (C, V) one chunk of tokens
    a = zs - lse(zs),  b = zt - lse(zt)
    MODE 0 forward KL  D = sum p_T (b - a)                        dz = p_S - p_T
    MODE 1 reverse KL  D = sum p_S (a - b)                        dz = p_S (a - b - D)
    MODE 2 JSD(beta)   log m = logaddexp(log(1-beta) + a, log(beta) + b)
                       D = beta sum p_T (b - log m) + (1-beta) K_S,  K_S = sum p_S (a - log m)
                       dz = (1-beta) p_S (a - log m - K_S)
    d(loss)/d(raw student logits) = coef * dz / tau, written in place over the student chunk.

The logits chunks are cuBLAS matmuls in the input dtype (float32 accumulation inside cuBLAS);
`_distill_rows_kernel` runs one program per token row and walks V in BLOCK_V tiles three
times (both log-normalisers with an online max; the divergence; the gradient), float32 math.
The host driver (`_distill_ref.run_chunks`) then forms dh = d(logits) @ W_S and
dW += d(logits)^T h_S with cuBLAS. Per chunk the (C, V) buffers are the only V-sized memory:
two of them, sized by `CHUNK_BYTES`. Cost: 4 matmuls (both logits, dh, dW) = 8 N H V FLOP for
H_S = H_T = H, the same as eager, plus ~4 reads and 1 write of each chunk's logits.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dispatch import TRITON_INTERPRET
from ._distill_ref import MIXTURE, chunk_rows, topk_rows

CHUNK_BYTES = 256 << 20  # one (C, V) logits buffer per model, in the logits' dtype
_ROW_ALIGN = 16 if TRITON_INTERPRET else 128


@triton.jit
def _distill_rows_kernel(
    zs_ptr,  # (C, V) raw student logits h_S W_S^T, row stride stride_s; overwritten by d(loss)/d(logits) (GRAD)
    zt_ptr,  # (C, V) raw teacher logits h_T W_T^T, row stride stride_t
    bs_ptr,  # (V,) student bias, or dummy (HAS_BS)
    bt_ptr,  # (V,) teacher bias, or dummy (HAS_BT)
    coef_ptr,  # (C,) float32 loss weight of each row (0 = not trained)
    div_ptr,  # (C,) float32 out: the divergence of each row
    stride_s, stride_t, inv_tau, beta, log_beta, log_1m_beta,
    V: tl.constexpr, MODE: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    # pass 1: both log-normalisers, per-lane online max merged at the end
    ms = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    mt = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    ss = tl.zeros((BLOCK_V,), tl.float32)
    st = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        zs, zt = _load_scaled(zs_row, zt_row, bs_ptr, bt_ptr, cols, inv_tau, V, HAS_BS, HAS_BT)
        ms_new, mt_new = tl.maximum(ms, zs), tl.maximum(mt, zt)
        ms_safe = tl.where(ms_new == float("-inf"), 0.0, ms_new)  # lanes that saw only padding
        mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        ss = ss * tl.exp(ms - ms_safe) + tl.exp(zs - ms_safe)
        st = st * tl.exp(mt - mt_safe) + tl.exp(zt - mt_safe)
        ms, mt = ms_new, mt_new
    ms_row, mt_row = tl.max(ms, axis=0), tl.max(mt, axis=0)
    lse_s = ms_row + tl.log(tl.sum(tl.where(ms == float("-inf"), 0.0, ss * tl.exp(ms - ms_row)), axis=0))
    lse_t = mt_row + tl.log(tl.sum(tl.where(mt == float("-inf"), 0.0, st * tl.exp(mt - mt_row)), axis=0))
    # pass 2: the divergence (and K_S = KL(p_S || m) for the mixture)
    acc_s = tl.zeros((BLOCK_V,), tl.float32)
    acc_t = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        zs, zt = _load_scaled(zs_row, zt_row, bs_ptr, bt_ptr, cols, inv_tau, V, HAS_BS, HAS_BT)
        a, b, ok = zs - lse_s, zt - lse_t, cols < V
        if MODE == 0:
            acc_t += tl.where(ok, tl.exp(b) * (b - a), 0.0)
        elif MODE == 1:
            acc_s += tl.where(ok, tl.exp(a) * (a - b), 0.0)
        else:
            log_m = _log_mixture(a, b, log_beta, log_1m_beta)
            acc_s += tl.where(ok, tl.exp(a) * (a - log_m), 0.0)
            acc_t += tl.where(ok, tl.exp(b) * (b - log_m), 0.0)
    k_s, k_t = tl.sum(acc_s, axis=0), tl.sum(acc_t, axis=0)
    if MODE == 0:
        div = k_t
    elif MODE == 1:
        div = k_s
    else:
        div = beta * k_t + (1.0 - beta) * k_s
    tl.store(div_ptr + row, div)
    if GRAD:
        # pass 3: coef * dD/dz / tau in place of the student logits (a row of coef 0 writes zeros)
        coef = tl.load(coef_ptr + row)
        scale = coef * inv_tau
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            zs, zt = _load_scaled(zs_row, zt_row, bs_ptr, bt_ptr, cols, inv_tau, V, HAS_BS, HAS_BT)
            a, b = zs - lse_s, zt - lse_t
            if MODE == 0:
                dz = tl.exp(a) - tl.exp(b)
            elif MODE == 1:
                dz = tl.exp(a) * (a - b - div)
            else:
                dz = (1.0 - beta) * tl.exp(a) * (a - _log_mixture(a, b, log_beta, log_1m_beta) - k_s)
            dz = tl.where(coef != 0.0, dz * scale, 0.0)
            tl.store(zs_row + cols, dz.to(zs_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _load_scaled(zs_row, zt_row, bs_ptr, bt_ptr, cols, inv_tau, V: tl.constexpr, HAS_BS: tl.constexpr,
                 HAS_BT: tl.constexpr):
    """One tile of both rows as float32 (z + b) / tau; columns >= V are -inf."""
    ok = cols < V
    zs = tl.load(zs_row + cols, mask=ok, other=0.0).to(tl.float32)
    zt = tl.load(zt_row + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BS:
        zs += tl.load(bs_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BT:
        zt += tl.load(bt_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, zs * inv_tau, float("-inf")), tl.where(ok, zt * inv_tau, float("-inf"))


@triton.jit
def _log_mixture(a, b, log_beta, log_1m_beta):
    """log(beta e^b + (1 - beta) e^a), stable."""
    x, y = a + log_1m_beta, b + log_beta
    hi = tl.maximum(x, y)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return hi_safe + tl.log(tl.exp(x - hi_safe) + tl.exp(y - hi_safe))


# Block sizes: the one place they are chosen (a streaming row kernel: wide tiles, enough warps).
_META = dict(BLOCK_V=128) if TRITON_INTERPRET else dict(BLOCK_V=4096, num_warps=16)


def distill_rows(zs, zt, bs, bt, coef, temperature: float, mode: int, beta: float, grad: bool) -> torch.Tensor:
    """Launch the row kernel on one chunk: returns D (C,) float32; with `grad`, zs becomes d(loss)/d(logits)."""
    rows, vocab = zs.shape
    div = torch.empty(rows, dtype=torch.float32, device=zs.device)
    if rows == 0:
        return div
    mix = mode == MIXTURE
    block = min(_META["BLOCK_V"], triton.next_power_of_2(vocab))
    _distill_rows_kernel[(rows,)](
        zs, zt, bs if bs is not None else div, bt if bt is not None else div, coef, div,
        zs.stride(0), zt.stride(0), 1.0 / temperature, float(beta),
        math.log(beta) if mix else 0.0, math.log1p(-beta) if mix else 0.0,
        V=vocab, MODE=mode, HAS_BS=bs is not None, HAS_BT=bt is not None, GRAD=grad,
        **{**_META, "BLOCK_V": block})
    return div


def _promote(hidden, weight):
    """cuBLAS needs one input dtype: the wider of hidden's and weight's."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype)


def make_triton_step(hs, ws, bs, ht, wt, bt, coef, temperature: float, mode: int, beta: float, top_k, grad: bool):
    """(step, rows, student weight for the dh matmul) for `run_chunks` on the Triton backend."""
    hs, ws = _promote(hs, ws)
    ht, wt = _promote(ht, wt)
    vocab = ws.shape[0]
    elem = max(hs.element_size(), ht.element_size())
    rows = chunk_rows(vocab, CHUNK_BYTES // elem, _ROW_ALIGN) if top_k is None else chunk_rows(vocab)
    rows = max(1, min(rows, hs.shape[0]))
    buf_s = torch.empty(rows, vocab, dtype=hs.dtype, device=hs.device)
    buf_t = torch.empty(rows, vocab, dtype=ht.dtype, device=ht.device)
    coef32 = coef.float().contiguous()

    def step(s, e):
        zs = torch.mm(hs[s:e], ws.T, out=buf_s[: e - s])
        zt = torch.mm(ht[s:e], wt.T, out=buf_t[: e - s])
        if top_k is not None:  # the approximation runs in torch on the chunk (float32)
            zs32 = (zs.float() + (bs.float() if bs is not None else 0.0)) / temperature
            zt32 = (zt.float() + (bt.float() if bt is not None else 0.0)) / temperature
            d, dz = topk_rows(zs32, zt32, mode, beta, top_k, coef32[s:e] if grad else None)
            return d, None if dz is None else (dz / temperature).to(hs.dtype)
        d = distill_rows(zs, zt, bs, bt, coef32[s:e], temperature, mode, beta, grad)
        return d, zs if grad else None

    return step, rows, ws, hs
