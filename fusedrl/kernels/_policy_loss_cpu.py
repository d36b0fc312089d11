"""The PyTorch path of `policy_loss` (CPU, float64, anywhere Triton does not run): few ops, no per-sequence sums.

Every aggregation mode is linear in the per-token values, so the loss is one dot product per
term with a detached per-token coefficient c_t (mask included):

    token_mean          c_t = m_t / sum_i n_i   (or / num_tokens)
    seq_mean            c_t = m_t / n_{i(t)} / B
    seq_sum             c_t = m_t / B
    seq_mean_fixed_len  c_t = m_t / max_len / B

and terms aggregated with the same mode share one dot product (pg + beta KL - c_ent H). The
metrics are token means over the micro-batch, so each is one dot product with the mask of a
tensor the loss already holds (no (N,) temporaries, no graph); only the token count per
sequence (for response_len and seq_mean) is a segment sum. The per-token formulas are
`policy_loss._surrogate`, `policy_loss.is_weights` and `kl.kl_from_delta`, shared with the
per-sequence form `policy_loss.policy_loss_reference`, which stays the readable statement of
the same sums.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._rl_layout import Layout, Number, segment_sum
from .kl import k3_value, kl_from_delta


def _coefficients(mode: str, mf, tokens, layout: Layout, cfg, num_tokens: Optional[Number],
                  num_seqs: Optional[Number], cache: Dict[str, torch.Tensor]) -> torch.Tensor:
    if mode in cache:
        return cache[mode]
    if mode == "token_mean":
        coef = mf / (tokens.sum().clamp(min=1) if num_tokens is None else num_tokens)
    else:
        seqs = max(layout.num_seqs, 1) if num_seqs is None else num_seqs
        if mode == "seq_mean":
            coef = (1.0 / (tokens.clamp(min=1) * seqs)).index_select(0, layout.seq_ids) * mf
        elif mode == "seq_sum":
            coef = mf / seqs
        else:
            coef = mf / (cfg.max_len * seqs)
    cache[mode] = coef
    return coef


def policy_loss_cpu(x, layout: Layout, cfg, num_tokens: Optional[Number],
                    num_seqs: Optional[Number]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (differentiable 0-d), sums (len(STATS),) float32 token totals, tokens (B,) float32)."""
    from .policy_loss import STATS, _surrogate, is_weights

    dtype = torch.float64 if x.logp.dtype == torch.float64 else torch.float32
    m = x.mask
    mf = m.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.logp.device)
    on_host = x.logp.device.type == "cpu"

    def clean(t):  # masked positions read as 0 so padding garbage (inf, NaN) cannot leak in
        if t is None:
            return None
        t = t.to(dtype)
        if not on_host:  # no host sync off the CPU
            return torch.where(m, t, zero)
        out = t * mf  # one fast op; where() only when a non-finite value is about (one host check)
        return out if torch.isfinite(out.detach().sum()) else torch.where(m, t, zero)

    logp, old, adv = clean(x.logp), clean(x.old).detach(), clean(x.adv).detach()
    ref, ent, sampler, sel = clean(x.ref), clean(x.entropy), clean(x.sampler), clean(x.sel)
    tokens = segment_sum(mf, layout)
    pg, clipped, ratio = _surrogate(logp, old, adv, sel, mf, tokens, layout, cfg)
    weight = None if sampler is None else is_weights(old, sampler.detach(), mf, tokens, layout, cfg)
    rest = weight if cfg.is_scope == "loss" else None
    kl_ref = None
    if ref is not None:
        kl_ref = kl_from_delta(logp - ref.detach(), cfg.kl_kind, cfg.kl_clamp, cfg.kl_value_clamp)
    cache: Dict[str, torch.Tensor] = {}
    groups: Dict[str, torch.Tensor] = {}  # aggregation mode -> per-token sum of the terms it aggregates

    def add(mode, value):
        groups[mode] = value if mode not in groups else groups[mode] + value

    add(cfg.aggregation, pg if weight is None else weight * pg)
    if cfg.beta > 0:
        add(cfg.kl_aggregation, cfg.beta * (kl_ref if rest is None else rest * kl_ref))
    if cfg.c_ent > 0:
        add(cfg.entropy_aggregation, -cfg.c_ent * (ent if rest is None else rest * ent))
    loss = None
    for mode, value in groups.items():
        coef = _coefficients(mode, mf, tokens, layout, cfg, num_tokens, num_seqs, cache)
        part = torch.dot(value, coef)
        loss = part if loss is None else loss + part
    with torch.no_grad():
        d_old = logp - old
        columns = {"clipped": clipped.to(dtype), "ratio": ratio, "ppo_kl": d_old.neg(), "kl_ref": kl_ref,
                   "entropy": ent, "is_weight": weight, "approx_kl": k3_value(d_old),
                   "is_dropped": None if weight is None else (weight == 0).to(dtype)}
        sums = [tokens.sum()] + [zero if columns[k] is None else torch.dot(columns[k], mf) for k in STATS[1:]]
        if weight is None:  # weight 1 on every token
            sums[STATS.index("is_weight")] = sums[0]
        sums = torch.stack(sums).float()
    return loss, sums, tokens.detach().float()
