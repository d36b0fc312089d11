"""Triton forward/backward of `policy_loss` on the flat (packed) layout.

One program per sequence walks its tokens [cu_seqlens[i], cu_seqlens[i+1]) in
blocks of BLOCK. Shapes: every per-token pointer is (N,), cu_seqlens (B + 1,)
int32; outputs terms (3, B) float32 (the per-sequence sums P_i, K_i, E_i of
policy_loss.py), stats (len(STATS), B) float32, and a (3, B) buffer
[s_i, G_i, log w_i] kept for the backward.

Forward, per token (r = exp(logp - old), w the importance weight, v = w or 1 by is_scope, m the mask):
    P_i = sum_t m_t w_t pg_t,   K_i = sum_t m_t v_t KL_t,   E_i = sum_t m_t v_t H_t
A first pass over the sequence gives the sequence ratio s_i (gspo, gspo_token, gmpo) and the
sequence log-weight log w_i (is_level "sequence" / "geometric").
Backward, given (a_i, b_i, c_i) = dL/d(P_i, K_i, E_i) from the aggregations:
    dlogp_t = a_i m_t w_t dpg_t/dlogp_t + b_i m_t v_t dKL_t/dlogp_t,   dH_t = c_i m_t v_t
gspo / gmpo: every token's pg depends on s_i = exp(sum_t m_t f(d_t) / n_i), so
    dlogp_u = a_i G_i s_i m_u f'(d_u) / n_i + (KL term),  G_i = sum_t m_t w_t dpg_t/ds
(f(d) = d for gspo; gmpo's sign-aware clipped d, f' = 1 where the clip is not active and A != 0).
The per-token math lives in @triton.jit helpers shared by both kernels.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .policy_loss import STATS, TERMS, FlatInputs, PolicyLossConfig

BLOCK = 1024  # tokens per step of a sequence's loop; the one block-size choice (tests shrink it)
NUM_WARPS = 4
KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "k3+": 3, "abs": 4, "k1+": 5}
IS_LEVEL_CODES = {"token": 0, "sequence": 1, "geometric": 2}


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (Kahan: (u - 1) x / log u, u = exp(x))."""
    u = tl.exp(x)
    small = tl.abs(x) < 0.5
    use_kahan = small & (u != 1.0)
    kahan = (u - 1.0) * x / tl.log(tl.where(use_kahan, u, 2.0))
    return tl.where(use_kahan, kahan, tl.where(small, x, u - 1.0))


@triton.jit
def _k3(delta):
    """exp(-delta) - 1 + delta: the Taylor series for |delta| < 0.1, expm1 beyond (kl.k3_value)."""
    small = tl.abs(delta) < 0.1
    d = tl.where(small, delta, 0.0)
    series = d * d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0 - d * (1.0 / 120.0 - d * (1.0 / 720.0 - d * (
        1.0 / 5040.0 - d / 40320.0))))))
    return tl.where(small, series, _expm1(-delta) + delta)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _kl_terms(delta, kl_clamp, kl_vclamp, KL_KIND: tl.constexpr, USE_CLAMP: tl.constexpr,
              USE_VCLAMP: tl.constexpr):
    """(KL_t, dKL_t/dlogp_t) of delta = logp - ref (kl.py's estimators)."""
    inside = delta == delta
    if USE_CLAMP:
        inside = (delta >= -kl_clamp) & (delta <= kl_clamp)
        delta = tl.minimum(tl.maximum(delta, -kl_clamp), kl_clamp)
    if KL_KIND == 0:
        kl = delta
        dkl = tl.full(delta.shape, 1.0, tl.float32)
    elif KL_KIND == 1:
        kl = 0.5 * delta * delta
        dkl = delta
    elif KL_KIND == 4:
        kl = tl.abs(delta)
        dkl = _sign(delta)
    elif KL_KIND == 5:  # k1+: value of k1, gradient of k2
        kl = delta
        dkl = delta
    else:
        kl = _k3(delta)
        if KL_KIND == 2:
            dkl = -_expm1(-delta)
        else:  # k3+: value of k3, gradient of k2
            dkl = delta
    if USE_VCLAMP:
        inside = inside & (kl >= -kl_vclamp) & (kl <= kl_vclamp)
        kl = tl.minimum(tl.maximum(kl, -kl_vclamp), kl_vclamp)
    return kl, tl.where(inside, dkl, 0.0)


@triton.jit
def _pg_terms(logp, old, adv, sel, seq_ratio, eps_low, eps_high, dual_clip, tau_pos, tau_neg, kl_cov_coef,
              ALGO: tl.constexpr, USE_DUAL: tl.constexpr):
    """Per-token (pg, dpg, clipped, ratio used); dpg = d pg / d logp, or d pg / d s for gspo (1) and gmpo (6)."""
    d = logp - old
    ratio = tl.exp(d)
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    if ALGO == 6:  # gmpo: -A g_i; clipped = the sign-aware log-ratio clip is active
        sgn = _sign(adv)
        dc = tl.minimum(tl.maximum(d, -eps_low), eps_high)
        r = seq_ratio + tl.zeros_like(logp)
        pg = -adv * r
        dpg = -adv
        clipped = sgn * d > sgn * dc
    elif ALGO <= 1 or ALGO == 5 or ALGO == 7:  # clipped surrogate: ppo/grpo, gspo, gspo_token, clip_cov
        if ALGO == 1 or ALGO == 5:
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
        if ALGO != 1:
            dpg = dpg * r  # chain rule: d r / d logp_t = r (gspo_token: s_i)
        clipped = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
        if ALGO == 7:
            pg = pg * (1.0 - sel)
            dpg = dpg * (1.0 - sel)
            clipped = sel > 0
    else:
        r = ratio
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
        elif ALGO == 8:  # kl_cov: -r A + sel coef |d|
            pg = -ratio * adv + sel * kl_cov_coef * tl.abs(d)
            dpg = -ratio * adv + sel * kl_cov_coef * _sign(d)
            clipped = sel > 0
        else:  # reinforce: -A logp
            pg = -adv * logp
            dpg = -adv
    return pg, dpg, clipped, r


@triton.jit
def _is_weight(log_w, is_low, is_cap, IS_MODE: tl.constexpr):
    w = tl.exp(log_w)
    if IS_MODE == 0:  # truncate
        return tl.minimum(tl.maximum(w, is_low), is_cap)
    return tl.where((w >= is_low) & (w <= is_cap), w, 0.0)  # mask


@triton.jit
def _load(ptr, offs, valid):
    return tl.where(valid, tl.load(ptr + offs, mask=valid, other=0.0).to(tl.float32), 0.0)


@triton.jit
def _first_pass(logp_ptr, old_ptr, adv_ptr, mask_ptr, sampler_ptr, start, end, eps_low, eps_high,
                ALGO: tl.constexpr, HAS_SAMPLER: tl.constexpr, BLOCK: tl.constexpr):
    """(sum_t m f(d_t), sum_t m (old - sampler), n_i) over one sequence (f: gspo's d, gmpo's clipped d)."""
    cols = tl.arange(0, BLOCK)
    acc_d = tl.zeros([BLOCK], tl.float32)
    acc_w = tl.zeros([BLOCK], tl.float32)
    acc_n = tl.zeros([BLOCK], tl.float32)
    off = start
    while off < end:  # while, not range: the bounds are loaded values
        offs = off + cols
        valid = (offs < end) & (_load(mask_ptr, offs, offs < end) != 0)
        old = _load(old_ptr, offs, valid)
        d = _load(logp_ptr, offs, valid) - old
        if ALGO == 6:
            sgn = _sign(_load(adv_ptr, offs, valid))
            dc = tl.minimum(tl.maximum(d, -eps_low), eps_high)
            d = sgn * tl.minimum(sgn * d, sgn * dc)
        acc_d += d
        if HAS_SAMPLER:
            acc_w += tl.where(valid, old - _load(sampler_ptr, offs, valid), 0.0)
        acc_n += valid.to(tl.float32)
        off += BLOCK
    return tl.sum(acc_d, 0), tl.sum(acc_w, 0), tl.sum(acc_n, 0)


@triton.jit
def _token_weight(old, sampler, seq_logw, is_low, is_cap, IS_LEVEL: tl.constexpr, IS_MODE: tl.constexpr,
                  HAS_SAMPLER: tl.constexpr):
    if HAS_SAMPLER:
        if IS_LEVEL == 0:
            return _is_weight(old - sampler, is_low, is_cap, IS_MODE)
        return _is_weight(seq_logw + tl.zeros_like(old), is_low, is_cap, IS_MODE)
    return tl.full(old.shape, 1.0, tl.float32)


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr,  # (N,) float, float, float32, float32 (0/1)
    ref_ptr, ent_ptr, sampler_ptr, sel_ptr,  # (N,) float each, or a dummy when absent
    cu_seqlens_ptr,  # (B + 1,) int32
    terms_ptr,  # (3, B) float32 out
    stats_ptr,  # (NUM_STATS, B) float32 out
    seq_ptr,  # (3, B) float32 out: s_i, G_i, log w_i
    num_seqs, eps_low, eps_high, dual_clip, tau_pos, tau_neg, kl_clamp, kl_vclamp, is_low, is_cap, kl_cov_coef,
    ALGO: tl.constexpr, KL_KIND: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr,
    HAS_SAMPLER: tl.constexpr, HAS_SEL: tl.constexpr, USE_DUAL: tl.constexpr, USE_CLAMP: tl.constexpr,
    USE_VCLAMP: tl.constexpr, IS_LEVEL: tl.constexpr, IS_MODE: tl.constexpr, IS_SCOPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    seq_ratio = 1.0
    seq_logw = 0.0
    if ALGO == 1 or ALGO == 5 or ALGO == 6 or IS_LEVEL != 0:
        sum_d, sum_w, n = _first_pass(logp_ptr, old_ptr, adv_ptr, mask_ptr, sampler_ptr, start, end, eps_low,
                                      eps_high, ALGO, HAS_SAMPLER, BLOCK)
        seq_ratio = tl.exp(sum_d / tl.maximum(n, 1.0))
        seq_logw = sum_w
        if IS_LEVEL == 2:
            seq_logw = sum_w / tl.maximum(n, 1.0)
    acc_pg = tl.zeros([BLOCK], tl.float32)
    acc_kl = tl.zeros([BLOCK], tl.float32)
    acc_ent = tl.zeros([BLOCK], tl.float32)
    n_acc = tl.zeros([BLOCK], tl.float32)
    clip_acc = tl.zeros([BLOCK], tl.float32)
    ratio_acc = tl.zeros([BLOCK], tl.float32)
    approx_acc = tl.zeros([BLOCK], tl.float32)
    k3_acc = tl.zeros([BLOCK], tl.float32)
    w_acc = tl.zeros([BLOCK], tl.float32)
    drop_acc = tl.zeros([BLOCK], tl.float32)
    g_acc = tl.zeros([BLOCK], tl.float32)
    off = start
    while off < end:
        offs = off + cols
        valid = (offs < end) & (_load(mask_ptr, offs, offs < end) != 0)
        logp = _load(logp_ptr, offs, valid)
        old = _load(old_ptr, offs, valid)
        sel = logp  # placeholder, unused unless HAS_SEL
        if HAS_SEL:
            sel = _load(sel_ptr, offs, valid)
        pg, dpg, clipped, ratio = _pg_terms(logp, old, _load(adv_ptr, offs, valid), sel, seq_ratio, eps_low,
                                            eps_high, dual_clip, tau_pos, tau_neg, kl_cov_coef, ALGO, USE_DUAL)
        w = _token_weight(old, _load(sampler_ptr, offs, valid), seq_logw, is_low, is_cap, IS_LEVEL,
                          IS_MODE, HAS_SAMPLER)
        v = tl.full(w.shape, 1.0, tl.float32)
        if IS_SCOPE == 1:
            v = w
        if HAS_REF:
            kl, _dkl = _kl_terms(logp - _load(ref_ptr, offs, valid), kl_clamp, kl_vclamp, KL_KIND, USE_CLAMP,
                                 USE_VCLAMP)
            acc_kl += tl.where(valid, v * kl, 0.0)
        if HAS_ENT:
            acc_ent += tl.where(valid, v * _load(ent_ptr, offs, valid), 0.0)
        d = logp - old
        acc_pg += tl.where(valid, w * pg, 0.0)
        n_acc += valid.to(tl.float32)
        clip_acc += tl.where(valid & clipped, 1.0, 0.0)
        ratio_acc += tl.where(valid, ratio, 0.0)
        approx_acc += tl.where(valid, -d, 0.0)
        k3_acc += tl.where(valid, _k3(d), 0.0)
        w_acc += tl.where(valid, w, 0.0)
        drop_acc += tl.where(valid & (w == 0.0), 1.0, 0.0)
        g_acc += tl.where(valid, w * dpg, 0.0)
        off += BLOCK
    tl.store(terms_ptr + seq, tl.sum(acc_pg, 0))
    tl.store(terms_ptr + num_seqs + seq, tl.sum(acc_kl, 0))
    tl.store(terms_ptr + 2 * num_seqs + seq, tl.sum(acc_ent, 0))
    tl.store(stats_ptr + 0 * num_seqs + seq, tl.sum(n_acc, 0))
    tl.store(stats_ptr + 1 * num_seqs + seq, tl.sum(clip_acc, 0))
    tl.store(stats_ptr + 2 * num_seqs + seq, tl.sum(ratio_acc, 0))
    tl.store(stats_ptr + 3 * num_seqs + seq, tl.sum(approx_acc, 0))
    tl.store(stats_ptr + 4 * num_seqs + seq, tl.sum(acc_kl, 0))
    tl.store(stats_ptr + 5 * num_seqs + seq, tl.sum(acc_ent, 0))
    tl.store(stats_ptr + 6 * num_seqs + seq, tl.sum(w_acc, 0))
    tl.store(stats_ptr + 7 * num_seqs + seq, tl.sum(k3_acc, 0))
    tl.store(stats_ptr + 8 * num_seqs + seq, tl.sum(drop_acc, 0))
    tl.store(seq_ptr + seq, seq_ratio)
    tl.store(seq_ptr + num_seqs + seq, tl.sum(g_acc, 0))
    tl.store(seq_ptr + 2 * num_seqs + seq, seq_logw)


@triton.jit
def _policy_loss_bwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr,  # (N,) as in the forward
    ref_ptr, sampler_ptr, sel_ptr,  # (N,) float each, or a dummy when absent
    cu_seqlens_ptr,  # (B + 1,) int32
    grad_ptr,  # (3, B) float32: dL / d(P_i, K_i, E_i)
    stats_ptr,  # (NUM_STATS, B) float32 from the forward (row 0: token counts)
    seq_ptr,  # (3, B) float32 from the forward
    dlogp_ptr,  # (N,) float32 out
    dent_ptr,  # (N,) float32 out, or a dummy when there is no entropy
    num_seqs, eps_low, eps_high, dual_clip, tau_pos, tau_neg, kl_clamp, kl_vclamp, is_low, is_cap, kl_cov_coef,
    ALGO: tl.constexpr, KL_KIND: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr,
    HAS_SAMPLER: tl.constexpr, HAS_SEL: tl.constexpr, USE_DUAL: tl.constexpr, USE_CLAMP: tl.constexpr,
    USE_VCLAMP: tl.constexpr, IS_LEVEL: tl.constexpr, IS_MODE: tl.constexpr, IS_SCOPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    g_pg = tl.load(grad_ptr + seq)
    g_kl = tl.load(grad_ptr + num_seqs + seq)
    g_ent = tl.load(grad_ptr + 2 * num_seqs + seq)
    cols = tl.arange(0, BLOCK)
    seq_ratio = tl.load(seq_ptr + seq)
    seq_logw = tl.load(seq_ptr + 2 * num_seqs + seq)
    tokens = tl.maximum(tl.load(stats_ptr + seq), 1.0)
    seq_term = g_pg * tl.load(seq_ptr + num_seqs + seq) * seq_ratio / tokens  # gspo / gmpo
    off = start
    while off < end:
        offs = off + cols
        inb = offs < end
        valid = inb & (_load(mask_ptr, offs, inb) != 0)
        logp = _load(logp_ptr, offs, valid)
        old = _load(old_ptr, offs, valid)
        adv = _load(adv_ptr, offs, valid)
        sel = logp
        if HAS_SEL:
            sel = _load(sel_ptr, offs, valid)
        _pg, dpg, clipped, _r = _pg_terms(logp, old, adv, sel, seq_ratio, eps_low, eps_high, dual_clip, tau_pos,
                                          tau_neg, kl_cov_coef, ALGO, USE_DUAL)
        w = _token_weight(old, _load(sampler_ptr, offs, valid), seq_logw, is_low, is_cap, IS_LEVEL,
                          IS_MODE, HAS_SAMPLER)
        v = tl.full(w.shape, 1.0, tl.float32)
        if IS_SCOPE == 1:
            v = w
        if ALGO == 1:
            d = seq_term + tl.zeros_like(logp)
        elif ALGO == 6:
            d = tl.where(clipped | (adv == 0), 0.0, seq_term)
        else:
            d = g_pg * w * dpg
        if HAS_REF:
            _kl, dkl = _kl_terms(logp - _load(ref_ptr, offs, valid), kl_clamp, kl_vclamp, KL_KIND, USE_CLAMP,
                                 USE_VCLAMP)
            d += g_kl * v * dkl
        tl.store(dlogp_ptr + offs, tl.where(valid, d, 0.0), mask=inb)
        if HAS_ENT:
            tl.store(dent_ptr + offs, tl.where(valid, g_ent * v, 0.0), mask=inb)
        off += BLOCK


def _scalars(cfg: PolicyLossConfig):
    return (float(cfg.eps_low), float(cfg.eps_high), float(cfg.dual_clip or 0.0), float(cfg.tau_pos),
            float(cfg.tau_neg), float(cfg.kl_clamp or 0.0), float(cfg.kl_value_clamp or 0.0),
            float(cfg.is_low or 0.0), float(cfg.is_cap), float(cfg.kl_cov_coef))


def _flags(cfg: PolicyLossConfig, ref, ent, sampler, sel):
    return dict(ALGO=cfg.algo_code, KL_KIND=KL_CODES[cfg.kl_kind], HAS_REF=ref is not None, HAS_ENT=ent is not None,
                HAS_SAMPLER=sampler is not None, HAS_SEL=sel is not None, USE_DUAL=cfg.dual_clip is not None,
                USE_CLAMP=cfg.kl_clamp is not None, USE_VCLAMP=cfg.kl_value_clamp is not None,
                IS_LEVEL=IS_LEVEL_CODES[cfg.is_level], IS_MODE=int(cfg.is_mode == "mask"),
                IS_SCOPE=int(cfg.is_scope == "loss"), BLOCK=BLOCK, num_warps=NUM_WARPS)


class _PolicyLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, old, adv, mask, ref, sampler, sel, cu_seqlens, cfg):
        num_seqs = cu_seqlens.numel() - 1
        dev = logp.device
        terms = torch.zeros(len(TERMS), num_seqs, dtype=torch.float32, device=dev)
        stats = torch.zeros(len(STATS), num_seqs, dtype=torch.float32, device=dev)
        seq_buf = torch.zeros(3, num_seqs, dtype=torch.float32, device=dev)
        if num_seqs > 0:
            _policy_loss_fwd_kernel[(num_seqs,)](
                logp, old, adv, mask, ref if ref is not None else logp, entropy if entropy is not None else logp,
                sampler if sampler is not None else logp, sel if sel is not None else logp, cu_seqlens, terms,
                stats, seq_buf, num_seqs, *_scalars(cfg), **_flags(cfg, ref, entropy, sampler, sel))
        ctx.save_for_backward(logp, entropy, old, adv, mask, ref, sampler, sel, cu_seqlens, stats, seq_buf)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(stats)
        return terms, stats

    @staticmethod
    def backward(ctx, grad_terms, _grad_stats):
        logp, entropy, old, adv, mask, ref, sampler, sel, cu_seqlens, stats, seq_buf = ctx.saved_tensors
        cfg = ctx.cfg
        num_seqs = cu_seqlens.numel() - 1
        dlogp = torch.zeros(logp.shape, dtype=torch.float32, device=logp.device)
        dent = torch.zeros_like(dlogp) if entropy is not None else None
        if num_seqs > 0:
            _policy_loss_bwd_kernel[(num_seqs,)](
                logp, old, adv, mask, ref if ref is not None else logp, sampler if sampler is not None else logp,
                sel if sel is not None else logp, cu_seqlens, grad_terms.float().contiguous(), stats, seq_buf,
                dlogp, dent if dent is not None else dlogp, num_seqs, *_scalars(cfg),
                **_flags(cfg, ref, entropy, sampler, sel))
        return (dlogp.to(logp.dtype), None if dent is None else dent.to(entropy.dtype),
                None, None, None, None, None, None, None, None)


def policy_loss_triton(x: FlatInputs, layout, cfg: PolicyLossConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `policy_loss_reference`: (terms (len(TERMS), B), stats (len(STATS), B))."""
    def flat(t):
        return None if t is None else t.contiguous()

    return _PolicyLossFn.apply(flat(x.logp), flat(x.entropy), flat(x.old), flat(x.adv.float()),
                               x.mask.to(torch.float32).contiguous(), flat(x.ref), flat(x.sampler),
                               None if x.sel is None else x.sel.float().contiguous(),
                               layout.cu_seqlens.contiguous(), cfg)
