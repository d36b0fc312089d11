"""Triton kernels: per-token log-probs and entropy from logits a model already produced.

    z = logits / tau  (N, V),  lse = logsumexp_v z,  logp = z[label] - lse,
    entropy = lse - sum_v p_v z_v,  d(logits) = (g_logp (onehot - p) - g_ent p (z - sum_v p_v z_v)) / tau

One program per row (rows on grid axis 0, so any number of tokens fits), V walked in
BLOCK_V tiles: forward is one read of the logits with an online log-sum-exp (running
max, rescaled sums of exp and of exp * z); backward is one read and one write of
d(logits) in the logits' dtype. No float32 copy of the logits is ever made.
Saved for backward: the logits themselves (no copy), lse and sum_v p_v z_v (N,) float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autocast import autocast_off_backward
from ._dispatch import TRITON_INTERPRET


@triton.jit
def _logits_logprobs_fwd_kernel(
    logits_ptr,  # (N, V) row stride stride_n, column stride stride_v, any float dtype
    labels_ptr,  # (N,) int32/int64
    logp_ptr,  # (N,) float32 out
    ent_ptr,  # (N,) float32 out (ENTROPY only)
    lse_ptr,  # (N,) float32 out, saved for backward
    pz_ptr,  # (N,) float32 out, saved for backward (ENTROPY only)
    stride_n, stride_v, inv_tau, ignore_index,
    V: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_n
    label = tl.load(labels_ptr + row).to(tl.int64)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # per-lane running max, merged at the end
    s = tl.zeros((BLOCK_V,), tl.float32)
    t = tl.zeros((BLOCK_V,), tl.float32)
    zl = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols * stride_v, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw only padding
        scale = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        s = s * scale + e
        if ENTROPY:
            t = t * scale + e * tl.where(cols < V, z, 0.0)
        zl += tl.where(cols == label, z, 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_row))
    s_row = tl.sum(s * scale, axis=0)
    lse = m_row + tl.log(s_row)
    valid = label != ignore_index
    tl.store(logp_ptr + row, tl.where(valid, tl.sum(zl, axis=0) - lse, 0.0))
    tl.store(lse_ptr + row, lse)
    if ENTROPY:
        pz = tl.sum(t * scale, axis=0) / s_row
        tl.store(ent_ptr + row, tl.where(valid, lse - pz, 0.0))
        tl.store(pz_ptr + row, pz)


@triton.jit
def _logits_logprobs_bwd_kernel(
    logits_ptr,  # (N, V) strides stride_n, stride_v
    labels_ptr,  # (N,) int
    lse_ptr,  # (N,) float32
    pz_ptr,  # (N,) float32 (ENTROPY only)
    g_logp_ptr,  # (N,) float32
    g_ent_ptr,  # (N,) float32 (ENTROPY only)
    dlogits_ptr,  # (N, V) contiguous, logits' dtype, out
    stride_n, stride_v, inv_tau, ignore_index,
    V: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    g_logp = tl.where(valid, tl.load(g_logp_ptr + row), 0.0)
    if ENTROPY:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + row), 0.0)
        pz = tl.load(pz_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(logits_ptr + row * stride_n + cols * stride_v, mask=cols < V, other=0.0).to(tl.float32) * inv_tau
        p = tl.exp(z - lse)
        dz = tl.where(cols == label, g_logp, 0.0) - g_logp * p
        if ENTROPY:
            dz -= g_ent * p * (z - pz)
        tl.store(dlogits_ptr + row * V + cols, (dz * inv_tau).to(dlogits_ptr.dtype.element_ty), mask=cols < V)


# Block sizes: the one place they are chosen (a streaming kernel: wide tiles, enough warps).
_META = dict(BLOCK_V=128) if TRITON_INTERPRET else dict(BLOCK_V=4096, num_warps=16)


def logits_logprobs_fwd(logits, labels, temperature, ignore_index, entropy):
    """logits (N, V), labels (N,) -> (logp, entropy|None, lse, pz|None), float32 (N,) each."""
    n, vocab = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    ent, pz = (torch.empty(n, **f32), torch.empty(n, **f32)) if entropy else (None, None)
    if n:
        block = min(_META["BLOCK_V"], triton.next_power_of_2(vocab))
        _logits_logprobs_fwd_kernel[(n,)](
            logits, labels, logp, ent if entropy else logp, lse, pz if entropy else lse,
            logits.stride(0), logits.stride(1), 1.0 / temperature, ignore_index,
            V=vocab, ENTROPY=entropy, **{**_META, "BLOCK_V": block})
    return logp, ent, lse, pz


def logits_logprobs_bwd(logits, labels, lse, pz, g_logp, g_ent, temperature, ignore_index):
    """d(logits) (N, V) contiguous in the logits' dtype."""
    n, vocab = logits.shape
    dlogits = torch.empty(n, vocab, dtype=logits.dtype, device=logits.device)
    if n:
        entropy = pz is not None
        g_logp = g_logp.float().contiguous()
        g_ent = g_ent.float().contiguous() if entropy else g_logp
        block = min(_META["BLOCK_V"], triton.next_power_of_2(vocab))
        _logits_logprobs_bwd_kernel[(n,)](
            logits, labels, lse, pz if entropy else lse, g_logp, g_ent, dlogits,
            logits.stride(0), logits.stride(1), 1.0 / temperature, ignore_index,
            V=vocab, ENTROPY=entropy, **{**_META, "BLOCK_V": block})
    return dlogits


class LogitsLogprobsTriton(torch.autograd.Function):
    """Triton op on 2-D logits (N, V) (any strides) and labels (N,)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy):
        logp, ent, lse, pz = logits_logprobs_fwd(logits, labels, temperature, ignore_index, return_entropy)
        ctx.save_for_backward(logits, labels, lse, pz)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return (logp, ent) if return_entropy else logp

    @staticmethod
    @autocast_off_backward
    def backward(ctx, g_logp, g_ent=None):
        logits, labels, lse, pz = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        dlogits = logits_logprobs_bwd(logits, labels, lse, pz, g_logp, g_ent, ctx.temperature, ctx.ignore_index)
        return dlogits, None, None, None, None
