"""The policy-gradient loss family (docs/objectives.md, "Policy losses"), returning (loss, metrics).

Per token (d_t = logp_t - old_t, ratio_t = exp(d_t), A_t the advantage, clip(.) = clamp to
[1 - eps_low, 1 + eps_high], n_i = masked tokens of sequence i, sg = stop-gradient):

    ppo / grpo  pg_t = -min(ratio_t A_t, clip(ratio_t) A_t); dual clip c: for A_t < 0, pg_t = min(pg_t, -c A_t)
    gspo        the same with the sequence ratio s_i = exp(sum_t m_t d_t / n_i) for every token
                (the gradient flows through the mean); seq_ratio "sum": s_i = exp(sum_t m_t d_t)
                (TRL RLOO's ratio of summed sequence log-probs)
    gspo_token  the same with s_it = sg(s_i) exp(logp_t - sg(logp_t)): value s_i, gradient s_i per token
    gmpo        pg_t = -A_t g_i, g_i = exp(sum_t m_t sgn(A_t) min(sgn(A_t) d_t, sgn(A_t) clamp(d_t, -eps_low,
                eps_high)) / n_i) (the geometric mean of the clipped token ratios; use seq_mean)
    cispo       pg_t = -sg(clip(ratio_t)) A_t logp_t
    sapo        pg_t = -g(ratio_t) A_t, g(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos if A_t >= 0 else tau_neg
    reinforce   pg_t = -A_t logp_t   (alias "rloo")
    clip_cov    ppo's pg_t times (1 - c_t): c_t = 1 on a random cov_ratio share of the tokens whose
                centred covariance (A_t - mean A)(logp_t - mean logp) lies in (cov_lb, cov_ub) and
                whose clip is not already active (Cui et al. 2025; verl's clip_cov)
    kl_cov      pg_t = -ratio_t A_t + c_t kl_cov_coef |d_t|, c_t = 1 on the cov_ratio share of tokens
                with the largest covariance (no clip; verl's kl_cov)
    KL_t = estimator(logp_t - ref_t) (kl.py), optionally value-clamped; H_t the entropy
    w_t  = importance weight of the learner vs the sampler, detached (1 without sampler_logp):
           level "token" exp(old_t - sampler_t), "sequence" exp(sum_t m_t (old_t - sampler_t)),
           "geometric" exp(mean_t ...); mode "truncate" clamps into [is_low, is_cap], "mask" zeroes
           a weight outside [is_low, is_cap]; is_veto zeroes every weight of a sequence holding a
           token ratio below it

Per sequence the three sums P_i = sum_t m_t w_t pg_t, K_i = sum_t m_t v_t KL_t, E_i = sum_t m_t v_t H_t
(v_t = 1 with is_scope "pg", the peers' form; v_t = w_t with is_scope "loss", the weight on the whole
per-token loss) are aggregated each with its own mode:

    loss = agg(P; aggregation) + beta agg(K; kl_aggregation) - c_ent agg(E; entropy_aggregation)

    token_mean          sum_i X_i / sum_i n_i                   (normaliser: num_tokens= when given)
    seq_mean            (1/B) sum_i X_i / n_i                   (B: num_seqs= when given)
    seq_sum             (1/B) sum_i X_i                         (verl "seq-mean-token-sum")
    seq_mean_fixed_len  (1/B) sum_i X_i / max_len               (Dr. GRPO)

A sequence with no masked token contributes 0 to every mode (its 1/n_i is
taken as 1 over an empty sum) and still counts in B: never NaN.

Layouts: padded (B, T) or packed (total,) + cu_seqlens (int32 (B + 1,)); a
padded batch runs as a packed one with B rows of T tokens. Gradients flow to
logp and entropy only: old_logp, ref_logp, sampler_logp and advantages are
constants of the step. On CUDA (and under force_backend("triton")) the
Triton kernels of `_policy_loss_triton` run one program per sequence (float32
math; float64 inputs always take the reference); the PyTorch reference below
runs otherwise and is the test oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ._autocast import autocast_aware
from . import _dispatch
from ._policy_loss_cpu import policy_loss_cpu
from ._policy_config import (AGGREGATIONS, ALGOS, CLIPPED_ALGOS, DUAL_CLIP_DEFAULT, IS_LEVELS, IS_MODES,
                             IS_SCOPES, PolicyLossConfig)
from ._rl_layout import (Layout, Number, check_normaliser, check_token_tensor, flat_mask, make_layout,
                         per_token_or_seq, segment_sum)
from ._validate import FLOAT_DTYPES, check_tensor
from .kl import k3_value, kl_from_delta
from ._ranges import op_range

__all__ = ["ALGOS", "AGGREGATIONS", "DUAL_CLIP_DEFAULT", "IS_LEVELS", "IS_MODES", "IS_SCOPES", "PolicyLossConfig",
           "policy_loss", "policy_loss_reference", "cov_selection"]

STATS = ("tokens", "clipped", "ratio", "ppo_kl", "kl_ref", "entropy", "is_weight", "approx_kl", "is_dropped")
TERMS = ("pg", "kl", "entropy")  # the rows of the per-sequence sums


@dataclass
class FlatInputs:
    """Inputs in the flat normal form, all (N,); optional ones None."""

    logp: torch.Tensor
    old: torch.Tensor  # detached
    adv: torch.Tensor  # detached, per token
    mask: torch.Tensor  # bool
    ref: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    sampler: Optional[torch.Tensor]
    sel: Optional[torch.Tensor] = None  # clip_cov / kl_cov: (N,) 0/1 selected tokens


def is_weights(old, sampler, mf, tokens, layout: Layout, cfg: PolicyLossConfig) -> torch.Tensor:
    """(N,) detached importance weights w_t (module docstring); masked inputs already read 0."""
    log_w = (old - sampler) * mf
    if cfg.is_level != "token":
        seq = segment_sum(log_w, layout)
        if cfg.is_level == "geometric":
            seq = seq / tokens.clamp(min=1)
        log_w = seq[layout.seq_ids]
    w = torch.exp(log_w)
    low = 0.0 if cfg.is_low is None else cfg.is_low
    if cfg.is_mode == "truncate":
        w = w.clamp(min=low, max=cfg.is_cap)
    else:
        w = torch.where((w >= low) & (w <= cfg.is_cap), w, torch.zeros_like(w))
    if cfg.is_veto is not None:  # a token ratio below is_veto zeroes its whole sequence (verl's veto)
        bad = (mf > 0) & (old - sampler < math.log(cfg.is_veto))
        vetoed = segment_sum(bad.to(w.dtype), layout) > 0
        w = torch.where(vetoed[layout.seq_ids], torch.zeros_like(w), w)
    return w.detach()


def _seq_mean(values, mf, tokens, layout):
    return (segment_sum(values * mf, layout) / tokens.clamp(min=1)).index_select(0, layout.seq_ids)


def _surrogate(logp, old, adv, sel, mf, tokens, layout, cfg) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (pg, clipped (bool), the ratio the algo uses)."""
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    d = logp - old
    ratio = torch.exp(d)
    if cfg.algo == "gmpo":
        sgn = torch.sign(adv)
        dc = d.clamp(-cfg.eps_low, cfg.eps_high)
        g = torch.exp(_seq_mean(sgn * torch.minimum(sgn * d, sgn * dc), mf, tokens, layout))
        return -adv * g, sgn * d > sgn * dc, g
    if cfg.algo in CLIPPED_ALGOS:
        r = ratio
        if cfg.algo in ("gspo", "gspo_token"):
            seq_d = segment_sum(d * mf, layout)[layout.seq_ids] if cfg.seq_ratio == "sum" else \
                _seq_mean(d, mf, tokens, layout)
            r = torch.exp(seq_d)
            if cfg.algo == "gspo_token":
                r = r.detach() * torch.exp(logp - logp.detach())
        pg = torch.maximum(-r * adv, -r.clamp(lo, hi) * adv)
        if cfg.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -cfg.dual_clip * adv), pg)
        clipped = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
        if cfg.algo == "clip_cov":
            pg, clipped = pg * (1 - sel), sel > 0
        return pg, clipped, r
    clipped = (ratio > hi) | (ratio < lo)
    if cfg.algo == "cispo":
        pg = -ratio.clamp(lo, hi).detach() * adv * logp
    elif cfg.algo == "sapo":
        tau = torch.where(adv >= 0, adv.new_tensor(cfg.tau_pos), adv.new_tensor(cfg.tau_neg))
        pg = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    elif cfg.algo == "kl_cov":
        pg, clipped = -ratio * adv + sel * cfg.kl_cov_coef * d.abs(), sel > 0
    else:
        pg = -adv * logp
    return pg, clipped, ratio


def policy_loss_reference(x: FlatInputs, layout: Layout, cfg: PolicyLossConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums (len(TERMS), B) (differentiable) and stats (len(STATS), B) (detached), via autograd."""
    dtype = torch.float64 if x.logp.dtype == torch.float64 else torch.float32
    m = x.mask
    mf = m.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.logp.device)

    def clean(t):  # masked positions read as 0 so padding garbage (inf, NaN) cannot leak in
        return None if t is None else torch.where(m, t.to(dtype), zero)

    logp, old, adv = clean(x.logp), clean(x.old).detach(), clean(x.adv).detach()
    ref, ent, sampler, sel = clean(x.ref), clean(x.entropy), clean(x.sampler), clean(x.sel)
    tokens = segment_sum(mf, layout)
    pg, clipped, ratio = _surrogate(logp, old, adv, sel, mf, tokens, layout, cfg)
    weight = torch.ones_like(pg) if sampler is None else is_weights(old, sampler.detach(), mf, tokens, layout, cfg)
    rest = weight if cfg.is_scope == "loss" else torch.ones_like(pg)
    kl_ref = torch.zeros_like(pg)
    if ref is not None:
        kl_ref = kl_from_delta(logp - ref.detach(), cfg.kl_kind, cfg.kl_clamp, cfg.kl_value_clamp)
    ent_t = ent if ent is not None else torch.zeros_like(pg)
    terms = torch.stack([segment_sum(torch.where(m, f * v, zero), layout)
                         for f, v in ((weight, pg), (rest, kl_ref), (rest, ent_t))])
    with torch.no_grad():
        d_old = logp - old
        dropped = (weight == 0).to(dtype) if sampler is not None else torch.zeros_like(pg)
        columns = [clipped.to(dtype), ratio, -d_old, kl_ref, ent_t, weight, k3_value(d_old), dropped]
        stats = torch.stack([tokens] + [segment_sum(torch.where(m, c, zero), layout) for c in columns])
    return terms, stats.float()


def _aggregate_one(seq_sums, tokens, layout, mode, max_len, num_tokens, num_seqs) -> torch.Tensor:
    if mode == "token_mean":
        denom = tokens.sum().clamp(min=1) if num_tokens is None else num_tokens
        return seq_sums.sum() / denom
    seqs = max(layout.num_seqs, 1) if num_seqs is None else num_seqs
    if mode == "seq_mean":
        return (seq_sums / tokens.to(seq_sums.dtype).clamp(min=1)).sum() / seqs
    if mode == "seq_sum":
        return seq_sums.sum() / seqs
    return seq_sums.sum() / max_len / seqs


def aggregate(terms: torch.Tensor, tokens: torch.Tensor, layout: Layout, cfg: PolicyLossConfig,
              num_tokens: Optional[Number], num_seqs: Optional[Number]) -> torch.Tensor:
    """The scalar loss from the per-sequence sums (len(TERMS), B) and token counts (B,)."""
    args = (tokens, layout)
    norm = (cfg.max_len, num_tokens, num_seqs)
    loss = _aggregate_one(terms[0], *args, cfg.aggregation, *norm)
    if cfg.beta > 0:
        loss = loss + cfg.beta * _aggregate_one(terms[1], *args, cfg.kl_aggregation, *norm)
    if cfg.c_ent > 0:
        loss = loss - cfg.c_ent * _aggregate_one(terms[2], *args, cfg.entropy_aggregation, *norm)
    return loss


def summarise(sums: torch.Tensor, tokens: torch.Tensor, cfg: PolicyLossConfig, has_ref: bool, has_ent: bool,
              has_sampler: bool) -> Dict[str, torch.Tensor]:
    """Metrics (0-d float32 tensors, token means over this micro-batch) from the stats' token totals
    (len(STATS),) and the tokens of each sequence (B,)."""
    count = sums[0].clamp(min=1)
    out = {"clip_frac": sums[1] / count, "ratio_mean": sums[2] / count, "approx_kl": sums[7] / count,
           "ppo_kl": sums[3] / count, "response_len": tokens.mean() if tokens.numel() else sums[0]}
    if has_ref:
        out["kl_ref"] = sums[4] / count
    if has_ent:
        out["entropy"] = sums[5] / count
    if has_sampler:
        out["is_weight_mean"] = sums[6] / count
        if cfg.is_mode == "mask":
            out["is_dropped_frac"] = sums[8] / count
    return out


def cov_selection(x: FlatInputs, cfg: PolicyLossConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(N,) 0/1 float tokens selected by Clip-Cov / KL-Cov (host sync: counts, nonzero, top-k).

    cov_t = (A_t - mean A)(logp_t - mean logp) over the masked tokens of this call.
    clip_cov: max(int(cov_ratio n), 1) tokens drawn at random (torch.randperm with `generator`)
    among masked tokens with cov_lb < cov_t < cov_ub whose clip is not active (pg2 > pg1 in verl's
    terms); kl_cov: the max(int(cov_ratio n), 1) masked tokens of largest cov_t.
    """
    m = x.mask
    sel = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    n = int(m.sum())
    if n == 0:
        return sel
    with torch.no_grad():
        logp, adv = x.logp.detach().double(), x.adv.double()
        cov = (adv - adv[m].mean()) * (logp - logp[m].mean())
        k = max(int(cfg.cov_ratio * n), 1)
        if cfg.algo == "kl_cov":
            valid = torch.nonzero(m).flatten()
            chosen = valid[torch.topk(cov[valid], min(k, valid.numel())).indices]
        else:
            ratio = torch.exp(logp - x.old.double())
            active = -adv * ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) > -adv * ratio
            candidates = torch.nonzero(m & ~active & (cov > cfg.cov_lb) & (cov < cfg.cov_ub)).flatten()
            perm = torch.randperm(candidates.numel(), generator=generator, device="cpu").to(m.device)
            chosen = candidates[perm[:k]]
        sel[chosen] = 1.0
    return sel


def _flatten(logp, old_logp, advantages, mask, ref_logp, entropy, sampler_logp, cu_seqlens, cfg, adv_layout=None):
    """Validate every input and bring it to the flat normal form."""
    check_tensor("logp", logp, dtypes=FLOAT_DTYPES)
    layout = make_layout(logp, cu_seqlens)
    if old_logp is None:
        old_logp = logp.detach()  # on-policy (one update per rollout): old = sg(logp), ratio 1, gradient of the surrogate
    check_token_tensor("old_logp", old_logp, layout)
    adv = per_token_or_seq("advantages", advantages, layout, adv_layout)
    optional = {}
    for name, value in (("ref_logp", ref_logp), ("entropy", entropy), ("sampler_logp", sampler_logp)):
        optional[name] = None if value is None else check_token_tensor(name, value, layout).reshape(-1)
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"beta={cfg.beta} > 0 needs ref_logp (the reference log-probs)")
    if cfg.c_ent > 0 and entropy is None:
        raise ValueError(f"c_ent={cfg.c_ent} > 0 needs entropy (per-token entropies)")
    tensors = dict(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, **optional)
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got " + ", ".join(f"{k} on {d}" for k, d in devices.items()))
    x = FlatInputs(logp=logp.reshape(-1), old=old_logp.detach().reshape(-1), adv=adv.detach(),
                   mask=flat_mask(mask, layout), ref=optional["ref_logp"], entropy=optional["entropy"],
                   sampler=optional["sampler_logp"])
    return x, layout


@op_range("policy_loss")
@autocast_aware("keep")
def policy_loss(
    logp: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    advantages_layout: Optional[str] = None,
    algo: str = "ppo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip=None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    ref_logp: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    kl_kind: str = "k3",
    kl_clamp: Optional[float] = None,
    kl_value_clamp: Optional[float] = None,
    entropy: Optional[torch.Tensor] = None,
    c_ent: float = 0.0,
    sampler_logp: Optional[torch.Tensor] = None,
    is_cap: float = 2.0,
    is_low: Optional[float] = None,
    is_level: str = "token",
    is_mode: str = "truncate",
    is_scope: str = "pg",
    is_veto: Optional[float] = None,
    aggregation: str = "token_mean",
    kl_aggregation: Optional[str] = None,
    entropy_aggregation: Optional[str] = None,
    max_len: Optional[int] = None,
    num_tokens: Optional[Number] = None,
    num_seqs: Optional[Number] = None,
    cov_ratio: float = 2e-4,
    cov_lb: float = 1.0,
    cov_ub: float = 5.0,
    kl_cov_coef: float = 1.0,
    seq_ratio: str = "mean",
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Policy-gradient loss of one (micro-)batch; formulas in the module docstring.

    Args:
        logp: (B, T) padded or (total,) packed float log pi_theta(y_t) (differentiable).
        old_logp: same shape, log-probs of the policy before this round of updates
            (the learner's, recomputed); None means on-policy, old = sg(logp) (ratio 1,
            the surrogate's gradient is A * grad logp), for any algo.
        advantages: per token (logp's shape) or per sequence (B,), float.
        mask: None (every token counts) or logp's shape; nonzero = completion token.
        cu_seqlens: (B + 1,) int32 boundaries when logp is packed (values checked on CPU only).
        advantages_layout: "token" | "sequence" | None. None reads the layout from the shape,
            and raises ValueError when both readings fit (packed, as many tokens as sequences).
        algo: "ppo" | "grpo" (clipped surrogate) | "gspo" | "gspo_token" | "gmpo" | "cispo" | "sapo"
            | "reinforce" | "rloo" | "clip_cov" | "kl_cov".
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] (DAPO clip-higher: eps_high 0.28;
            CISPO: a large eps_high such as 4 or 5; GMPO: the log-ratio range [-eps_low, eps_high],
            0.4 in the paper). Also used for the clip_frac metric.
        dual_clip: None, True (= DUAL_CLIP_DEFAULT, 3, verl's clip_ratio_c) or c > 1: for A < 0 the
            loss is capped at -c A (the clipped algos).
        tau_pos, tau_neg: SAPO gate temperatures for A >= 0 and A < 0.
        ref_logp: logp's shape, frozen reference log-probs: the KL penalty (beta > 0) and the kl_ref metric.
        beta: KL coefficient (0 = no penalty); kl_kind: "k1" | "k2" | "k3" | "k3+" | "abs" | "k1+";
        kl_clamp: None or c: clamp logp - ref_logp to [-c, c] before the estimator;
        kl_value_clamp: None or c: clamp the estimate to [-c, c] (verl low_var_kl: kl_clamp=20, 10 here).
        entropy: logp's shape, per-token entropies (differentiable): the bonus and the entropy metric.
        c_ent: entropy bonus coefficient (loss -= c_ent * agg(H)).
        sampler_logp: logp's shape, log-probs of the sampler (e.g. vLLM): enables the importance
            weights w (module docstring), detached.
        is_cap, is_low: upper (2) and lower (None = 0) bounds of w.
        is_level: "token" | "sequence" (product of the token ratios) | "geometric" (their geometric mean).
        is_mode: "truncate" (clamp w into [is_low, is_cap]) | "mask" (w = 0 outside it).
        is_scope: "pg" (w multiplies the policy-gradient term only: w pg + beta KL - c_ent H, as verl,
            TRL and OpenRLHF; the default) | "loss" (w multiplies the whole per-token loss, the old form).
        is_veto: None or v > 0: a sequence with any token whose exp(old - sampler) < v gets w = 0 on
            every token (verl's rollout_is_veto_threshold).
        aggregation: "token_mean" | "seq_mean" | "seq_sum" | "seq_mean_fixed_len" (the last needs max_len),
            for the policy-gradient term.
        kl_aggregation, entropy_aggregation: the mode of the KL and entropy terms (None: `aggregation`);
            TRL's entropy bonus is entropy_aggregation="token_mean".
        max_len: L_max for "seq_mean_fixed_len".
        num_tokens: global token count (host number or tensor) normalising "token_mean" under
            gradient accumulation; default this batch's count.
        num_seqs: global sequence count normalising the seq modes; default this batch's B.
        cov_ratio, cov_lb, cov_ub: Clip-Cov / KL-Cov share of tokens and Clip-Cov's covariance window
            (verl: 2e-4, 1, 5); kl_cov_coef: KL-Cov's coefficient of |logp - old| (verl's ppo_kl_coef).
            These two algos select tokens on the host (`cov_selection`: a sync).
        seq_ratio: gspo / gspo_token sequence log-ratio: "mean" (GSPO) or "sum" (exp(sum logp - sum old):
            TRL's RLOO ratio of summed sequence log-probs; with aggregation "seq_mean" the loss is
            the mean over sequences of -min(s A, clip(s) A)).
        generator: torch.Generator for Clip-Cov's random draw (None: the global RNG).
    Returns:
        loss: 0-d float32 (float64 for float64 logp).
        metrics: dict of detached 0-d float32 tensors, token means over this batch:
            "clip_frac" (tokens whose clip is active: A > 0 and r > 1 + eps_high or A < 0 and
            r < 1 - eps_low for the clipped algos; r outside the range for the others; the
            log-ratio clip for gmpo; the selected tokens for clip_cov / kl_cov),
            "ratio_mean", "approx_kl" (k3 of logp vs old_logp, exp(old - logp) - 1 - (old - logp),
            never negative), "ppo_kl" (mean of
            old_logp - logp: what verl logs as actor/ppo_kl), "response_len" (mean tokens per sequence), and "kl_ref" / "entropy" / "is_weight_mean" when those inputs are given
            ("is_dropped_frac" too with is_mode "mask").
    """
    cfg = PolicyLossConfig(algo=algo, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, tau_pos=tau_pos,
                           tau_neg=tau_neg, beta=beta, kl_kind=kl_kind, kl_clamp=kl_clamp,
                           kl_value_clamp=kl_value_clamp, c_ent=c_ent, is_cap=is_cap, is_low=is_low,
                           is_level=is_level, is_mode=is_mode, is_scope=is_scope, is_veto=is_veto, aggregation=aggregation,
                           kl_aggregation=kl_aggregation, entropy_aggregation=entropy_aggregation,
                           max_len=max_len, cov_ratio=cov_ratio, cov_lb=cov_lb, cov_ub=cov_ub,
                           kl_cov_coef=kl_cov_coef, seq_ratio=seq_ratio)
    check_normaliser("num_tokens", num_tokens)
    check_normaliser("num_seqs", num_seqs)
    x, layout = _flatten(logp, old_logp, advantages, mask, ref_logp, entropy, sampler_logp, cu_seqlens, cfg,
                         advantages_layout)
    if cfg.algo in ("clip_cov", "kl_cov"):
        x.sel = cov_selection(x, cfg, generator)
    if x.logp.dtype != torch.float64 and _dispatch.use_triton(x.logp, x.old, x.adv):
        from ._policy_loss_triton import policy_loss_triton

        terms, stats = policy_loss_triton(x, layout, cfg)
        loss = aggregate(terms, stats[0], layout, cfg, num_tokens, num_seqs)
        sums, tokens = stats.sum(dim=1), stats[0]
    else:
        loss, sums, tokens = policy_loss_cpu(x, layout, cfg, num_tokens, num_seqs)
    metrics = summarise(sums, tokens, cfg, ref_logp is not None, entropy is not None, sampler_logp is not None)
    return loss, metrics
