"""Per-token math of the policy-loss Triton kernels (@triton.jit helpers, shared by forward and backward).

The formulas are those of policy_loss.py (and kl.py for the estimators); the kernels and their
launcher live in `_policy_loss_triton`.
"""
import triton
import triton.language as tl


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
