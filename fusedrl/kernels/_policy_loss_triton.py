"""Triton forward/backward of `policy_loss` on the flat (packed) layout.

One program per sequence walks its tokens [cu_seqlens[i], cu_seqlens[i+1]) in
blocks of BLOCK. Shapes: every per-token pointer is (N,), cu_seqlens (B + 1,)
int32; outputs seq_loss (B,) float32, stats (len(STATS), B) float32, and for
GSPO a (2, B) buffer [s_i, G_i] kept for the backward.

Forward, per token (r = exp(logp - old), w the truncated IS weight, m the mask):
    seq_loss_i = sum_t m_t w_t (pg_t + beta KL_t - c_ent H_t)        (formulas in policy_loss.py)
Backward, given c_i = dL/dseq_loss_i from the aggregation:
    dlogp_t = c_i m_t w_t (dpg_t/dlogp_t + beta dKL_t/dlogp_t),      dH_t = -c_i m_t w_t c_ent
GSPO: every token of sequence i uses s_i = exp(sum_t m_t (logp_t - old_t) / n_i), so
    dlogp_u = c_i (m_u w_u beta dKL_u + G_i s_i m_u / n_i),  G_i = sum_t m_t w_t dpg_t/ds.
The per-token math lives in one @triton.jit helper shared by both kernels.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .policy_loss import STATS, FlatInputs, PolicyLossConfig

BLOCK = 1024  # tokens per step of a sequence's loop; the one block-size choice (tests shrink it)
NUM_WARPS = 4
KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "k3+": 3}


@triton.jit
def _token_terms(logp, old, adv, ref, sampler, seq_ratio, eps_low, eps_high, dual_clip, tau_pos, tau_neg, beta,
                 kl_clamp, is_cap, ALGO: tl.constexpr, KL_KIND: tl.constexpr, HAS_REF: tl.constexpr,
                 HAS_SAMPLER: tl.constexpr, USE_DUAL: tl.constexpr, USE_CLAMP: tl.constexpr):
    """Per-token (pg + beta KL, dpg, beta dKL/dlogp, clipped, ratio used, approx KL, KL, IS weight)."""
    d_old = logp - old
    ratio = tl.exp(d_old)
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    if ALGO <= 1:  # clipped surrogate: token ratio (ppo/grpo) or sequence ratio (gspo)
        if ALGO == 1:
            r = seq_ratio + tl.zeros_like(logp)
        else:
            r = ratio
        unclipped = -r * adv
        clipped_val = -tl.minimum(tl.maximum(r, lo), hi) * adv
        use_clip = clipped_val > unclipped
        pg = tl.where(use_clip, clipped_val, unclipped)
        dpg = tl.where(use_clip, 0.0, -adv)  # d pg / d r
        if USE_DUAL:
            capped = (adv < 0) & (pg > -dual_clip * adv)
            pg = tl.where(capped, -dual_clip * adv, pg)
            dpg = tl.where(capped, 0.0, dpg)
        if ALGO == 0:
            dpg = dpg * r  # chain rule: d r / d logp = r
        clipped = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
        ratio = r
    else:
        clipped = (ratio > hi) | (ratio < lo)
        if ALGO == 2:  # cispo: -sg(clip(r)) A logp
            rc = tl.minimum(tl.maximum(ratio, lo), hi)
            pg = -rc * adv * logp
            dpg = -rc * adv
        elif ALGO == 3:  # sapo: -sigmoid(tau (r - 1)) 4 / tau A
            tau = tl.where(adv >= 0, tau_pos, tau_neg)
            sig = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))
            pg = -sig * 4.0 / tau * adv
            dpg = -adv * 4.0 * sig * (1.0 - sig) * ratio
        else:  # reinforce: -A logp
            pg = -adv * logp
            dpg = -adv
    approx = tl.exp(-d_old) - 1.0 + d_old
    kl = tl.zeros_like(logp)
    dkl = tl.zeros_like(logp)
    if HAS_REF:
        delta = logp - ref
        inside = tl.full(delta.shape, 1, tl.int1)
        if USE_CLAMP:
            inside = (delta >= -kl_clamp) & (delta <= kl_clamp)
            delta = tl.minimum(tl.maximum(delta, -kl_clamp), kl_clamp)
        if KL_KIND == 0:
            kl = delta
            dkl = tl.full(delta.shape, 1.0, tl.float32)
        elif KL_KIND == 1:
            kl = 0.5 * delta * delta
            dkl = delta
        else:
            kl = tl.exp(-delta) - 1.0 + delta
            if KL_KIND == 2:
                dkl = 1.0 - tl.exp(-delta)
            else:  # k3+: value of k3, gradient of k2
                dkl = delta
        dkl = tl.where(inside, beta * dkl, 0.0)
    weight = tl.full(logp.shape, 1.0, tl.float32)
    if HAS_SAMPLER:
        weight = tl.minimum(tl.exp(old - sampler), is_cap)
    return pg + beta * kl, dpg, dkl, clipped, ratio, approx, kl, weight


@triton.jit
def _load(ptr, offs, valid):
    return tl.where(valid, tl.load(ptr + offs, mask=valid, other=0.0).to(tl.float32), 0.0)


@triton.jit
def _load_inputs(logp_ptr, old_ptr, adv_ptr, ref_ptr, sampler_ptr, offs, valid,
                 HAS_REF: tl.constexpr, HAS_SAMPLER: tl.constexpr):
    """(logp, old, adv, ref, sampler) float32 at `offs`, 0 where not valid: what `_token_terms` takes.

    One loader for the forward and the backward, which must see the same per-token terms.
    """
    logp = _load(logp_ptr, offs, valid)
    old = _load(old_ptr, offs, valid)
    ref = logp  # placeholder, unused unless HAS_REF
    if HAS_REF:
        ref = _load(ref_ptr, offs, valid)
    sampler = old  # placeholder, unused unless HAS_SAMPLER
    if HAS_SAMPLER:
        sampler = _load(sampler_ptr, offs, valid)
    return logp, old, _load(adv_ptr, offs, valid), ref, sampler


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr,  # (N,) float, float, float32, float32 (0/1)
    ref_ptr, ent_ptr, sampler_ptr,  # (N,) float each, or a dummy when absent
    cu_seqlens_ptr,  # (B + 1,) int32
    seq_loss_ptr,  # (B,) float32 out
    stats_ptr,  # (NUM_STATS, B) float32 out
    gspo_ptr,  # (2, B) float32 out: s_i, G_i (GSPO only)
    num_seqs, eps_low, eps_high, dual_clip, tau_pos, tau_neg, beta, c_ent, kl_clamp, is_cap,
    ALGO: tl.constexpr, KL_KIND: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr,
    HAS_SAMPLER: tl.constexpr, USE_DUAL: tl.constexpr, USE_CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    seq_ratio = 1.0
    if ALGO == 1:  # GSPO first pass: the sequence's mean log-ratio over masked tokens
        acc_d = tl.zeros([BLOCK], tl.float32)
        acc_n = tl.zeros([BLOCK], tl.float32)
        off = start
        while off < end:  # while, not range: the bounds are loaded values
            offs = off + cols
            valid = (offs < end) & (_load(mask_ptr, offs, offs < end) != 0)
            acc_d += _load(logp_ptr, offs, valid) - _load(old_ptr, offs, valid)
            acc_n += valid.to(tl.float32)
            off += BLOCK
        seq_ratio = tl.exp(tl.sum(acc_d, 0) / tl.maximum(tl.sum(acc_n, 0), 1.0))
    acc = tl.zeros([BLOCK], tl.float32)
    n_acc = tl.zeros([BLOCK], tl.float32)
    clip_acc = tl.zeros([BLOCK], tl.float32)
    ratio_acc = tl.zeros([BLOCK], tl.float32)
    approx_acc = tl.zeros([BLOCK], tl.float32)
    kl_acc = tl.zeros([BLOCK], tl.float32)
    ent_acc = tl.zeros([BLOCK], tl.float32)
    w_acc = tl.zeros([BLOCK], tl.float32)
    g_acc = tl.zeros([BLOCK], tl.float32)
    off = start
    while off < end:
        offs = off + cols
        valid = (offs < end) & (_load(mask_ptr, offs, offs < end) != 0)
        logp, old, adv, ref, sampler = _load_inputs(logp_ptr, old_ptr, adv_ptr, ref_ptr, sampler_ptr, offs, valid,
                                                    HAS_REF, HAS_SAMPLER)
        loss, dpg, dkl, clipped, ratio, approx, kl, w = _token_terms(
            logp, old, adv, ref, sampler, seq_ratio, eps_low, eps_high, dual_clip,
            tau_pos, tau_neg, beta, kl_clamp, is_cap, ALGO, KL_KIND, HAS_REF, HAS_SAMPLER, USE_DUAL, USE_CLAMP)
        if HAS_ENT:
            ent = _load(ent_ptr, offs, valid)
            loss = loss - c_ent * ent
            ent_acc += ent
        vf = valid.to(tl.float32)
        acc += tl.where(valid, w * loss, 0.0)
        n_acc += vf
        clip_acc += tl.where(valid & clipped, 1.0, 0.0)
        ratio_acc += tl.where(valid, ratio, 0.0)
        approx_acc += tl.where(valid, approx, 0.0)
        kl_acc += tl.where(valid, kl, 0.0)
        w_acc += tl.where(valid, w, 0.0)
        g_acc += tl.where(valid, w * dpg, 0.0)
        off += BLOCK
    tl.store(seq_loss_ptr + seq, tl.sum(acc, 0))
    tl.store(stats_ptr + 0 * num_seqs + seq, tl.sum(n_acc, 0))
    tl.store(stats_ptr + 1 * num_seqs + seq, tl.sum(clip_acc, 0))
    tl.store(stats_ptr + 2 * num_seqs + seq, tl.sum(ratio_acc, 0))
    tl.store(stats_ptr + 3 * num_seqs + seq, tl.sum(approx_acc, 0))
    tl.store(stats_ptr + 4 * num_seqs + seq, tl.sum(kl_acc, 0))
    tl.store(stats_ptr + 5 * num_seqs + seq, tl.sum(ent_acc, 0))
    tl.store(stats_ptr + 6 * num_seqs + seq, tl.sum(w_acc, 0))
    if ALGO == 1:
        tl.store(gspo_ptr + seq, seq_ratio)
        tl.store(gspo_ptr + num_seqs + seq, tl.sum(g_acc, 0))


@triton.jit
def _policy_loss_bwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr,  # (N,) as in the forward
    ref_ptr, sampler_ptr,  # (N,) float each, or a dummy when absent
    cu_seqlens_ptr,  # (B + 1,) int32
    grad_seq_ptr,  # (B,) float32: dL / dseq_loss_i
    stats_ptr,  # (NUM_STATS, B) float32 from the forward (row 0: token counts)
    gspo_ptr,  # (2, B) float32 from the forward
    dlogp_ptr,  # (N,) float32 out
    dent_ptr,  # (N,) float32 out, or a dummy when there is no entropy
    num_seqs, eps_low, eps_high, dual_clip, tau_pos, tau_neg, beta, c_ent, kl_clamp, is_cap,
    ALGO: tl.constexpr, KL_KIND: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr,
    HAS_SAMPLER: tl.constexpr, USE_DUAL: tl.constexpr, USE_CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    coef = tl.load(grad_seq_ptr + seq)
    cols = tl.arange(0, BLOCK)
    seq_ratio = 1.0
    gspo_term = 0.0
    if ALGO == 1:
        seq_ratio = tl.load(gspo_ptr + seq)
        tokens = tl.maximum(tl.load(stats_ptr + seq), 1.0)
        gspo_term = tl.load(gspo_ptr + num_seqs + seq) * seq_ratio / tokens
    off = start
    while off < end:
        offs = off + cols
        inb = offs < end
        valid = inb & (_load(mask_ptr, offs, inb) != 0)
        logp, old, adv, ref, sampler = _load_inputs(logp_ptr, old_ptr, adv_ptr, ref_ptr, sampler_ptr, offs, valid,
                                                    HAS_REF, HAS_SAMPLER)
        _, dpg, dkl, _c, _r, _a, _k, w = _token_terms(
            logp, old, adv, ref, sampler, seq_ratio, eps_low, eps_high, dual_clip,
            tau_pos, tau_neg, beta, kl_clamp, is_cap, ALGO, KL_KIND, HAS_REF, HAS_SAMPLER, USE_DUAL, USE_CLAMP)
        if ALGO == 1:
            d = w * dkl + gspo_term
        else:
            d = w * (dpg + dkl)
        tl.store(dlogp_ptr + offs, tl.where(valid, coef * d, 0.0), mask=inb)
        if HAS_ENT:
            tl.store(dent_ptr + offs, tl.where(valid, -coef * c_ent * w, 0.0), mask=inb)
        off += BLOCK


def _scalars(cfg: PolicyLossConfig):
    return (float(cfg.eps_low), float(cfg.eps_high), float(cfg.dual_clip or 0.0), float(cfg.tau_pos),
            float(cfg.tau_neg), float(cfg.beta), float(cfg.c_ent), float(cfg.kl_clamp or 0.0), float(cfg.is_cap))


def _flags(cfg: PolicyLossConfig, ref, ent, sampler):
    return dict(ALGO=cfg.algo_code, KL_KIND=KL_CODES[cfg.kl_kind], HAS_REF=ref is not None, HAS_ENT=ent is not None,
                HAS_SAMPLER=sampler is not None, USE_DUAL=cfg.dual_clip is not None,
                USE_CLAMP=cfg.kl_clamp is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


class _PolicyLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, old, adv, mask, ref, sampler, cu_seqlens, cfg):
        num_seqs = cu_seqlens.numel() - 1
        dev = logp.device
        seq_loss = torch.zeros(num_seqs, dtype=torch.float32, device=dev)
        stats = torch.zeros(len(STATS), num_seqs, dtype=torch.float32, device=dev)
        gspo = torch.zeros(2, num_seqs, dtype=torch.float32, device=dev)
        if num_seqs > 0:
            _policy_loss_fwd_kernel[(num_seqs,)](
                logp, old, adv, mask, ref if ref is not None else logp, entropy if entropy is not None else logp,
                sampler if sampler is not None else logp, cu_seqlens, seq_loss, stats, gspo, num_seqs,
                *_scalars(cfg), **_flags(cfg, ref, entropy, sampler))
        ctx.save_for_backward(logp, entropy, old, adv, mask, ref, sampler, cu_seqlens, stats, gspo)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(stats)
        return seq_loss, stats

    @staticmethod
    def backward(ctx, grad_seq_loss, _grad_stats):
        logp, entropy, old, adv, mask, ref, sampler, cu_seqlens, stats, gspo = ctx.saved_tensors
        cfg = ctx.cfg
        num_seqs = cu_seqlens.numel() - 1
        dlogp = torch.zeros(logp.shape, dtype=torch.float32, device=logp.device)
        dent = torch.zeros_like(dlogp) if entropy is not None else None
        if num_seqs > 0:
            _policy_loss_bwd_kernel[(num_seqs,)](
                logp, old, adv, mask, ref if ref is not None else logp, sampler if sampler is not None else logp,
                cu_seqlens, grad_seq_loss.float().contiguous(), stats, gspo, dlogp,
                dent if dent is not None else dlogp, num_seqs, *_scalars(cfg), **_flags(cfg, ref, entropy, sampler))
        return (dlogp.to(logp.dtype), None if dent is None else dent.to(entropy.dtype),
                None, None, None, None, None, None, None)


def policy_loss_triton(x: FlatInputs, layout, cfg: PolicyLossConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `policy_loss_reference`: (seq_loss (B,), stats (len(STATS), B))."""
    def flat(t):
        return None if t is None else t.contiguous()

    return _PolicyLossFn.apply(flat(x.logp), flat(x.entropy), flat(x.old), flat(x.adv.float()),
                               x.mask.to(torch.float32).contiguous(), flat(x.ref), flat(x.sampler),
                               layout.cu_seqlens.contiguous(), cfg)
