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
from torch.autograd.function import once_differentiable

from ._rl_layout import Layout, Number, segment_sum
from . import kl as _kl
from .kl import k3_and_grad, k3_value, kl_from_delta


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
    if fast_path_applies(x, cfg):
        out = policy_loss_fast(x, layout, cfg, num_tokens, num_seqs)
        if out is not None:
            return out
    return policy_loss_general(x, layout, cfg, num_tokens, num_seqs)


def policy_loss_general(x, layout: Layout, cfg, num_tokens: Optional[Number],
                        num_seqs: Optional[Number]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every algo and option: per-token values under autograd, one dot product per aggregation mode."""
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


FAST_ALGOS = ("ppo", "grpo")


def fast_path_applies(x, cfg) -> bool:
    """The common RL step (PPO / GRPO clip, no dual clip, no sampler weights, k3 or no KL) on the host."""
    return (x.logp.device.type == "cpu" and cfg.algo in FAST_ALGOS and cfg.dual_clip is None
            and x.sampler is None and x.sel is None
            and (cfg.beta == 0 or (cfg.kl_kind == "k3" and cfg.kl_clamp is None and cfg.kl_value_clamp is None)))


class _Presolved(torch.autograd.Function):
    """loss = value, with d loss / d logp = g_logp and d loss / d entropy = g_ent given (per token)."""

    @staticmethod
    def forward(ctx, logp, entropy, value, g_logp, g_ent):
        ctx.save_for_backward(g_logp, g_ent)
        ctx.shapes = (logp.shape, logp.dtype, None if entropy is None else (entropy.shape, entropy.dtype))
        return value.clone()

    @staticmethod
    @once_differentiable  # first order only: the given gradients are constants
    def backward(ctx, grad):
        g_logp, g_ent = ctx.saved_tensors
        (shape, dtype), ent = ctx.shapes[:2], ctx.shapes[2]
        d_logp = (g_logp * grad).to(dtype).view(shape) if ctx.needs_input_grad[0] else None
        d_ent = None
        if ent is not None and g_ent is not None and ctx.needs_input_grad[1]:
            d_ent = (g_ent * grad).to(ent[1]).view(ent[0])
        return d_logp, d_ent, None, None, None


def _token_counts(m: torch.Tensor, layout: Layout, dtype) -> torch.Tensor:
    """Masked tokens per sequence (B,) from an int32 prefix sum at the boundaries (exact, no scatter)."""
    csum = torch.zeros(m.numel() + 1, dtype=torch.int32, device=m.device)
    torch.cumsum(m, 0, dtype=torch.int32, out=csum[1:])
    cu = layout.cu_seqlens
    return (csum.index_select(0, cu[1:]) - csum.index_select(0, cu[:-1])).to(dtype)


def _clipped_surrogate(x, mf, dtype, cfg):
    """(pg, g = d pg / d logp, [clipped, ratio, ppo_kl, approx_kl] token totals) of PPO / GRPO, no graph.

    pg_t = -min(r A, clip(r) A); its gradient is -r A off the clip and 0 on it (the clip flag of
    the metric). Temporaries are dropped as soon as their metric is summed (peak memory).
    """
    logp = x.logp.detach().to(dtype)
    adv = x.adv.to(dtype) * mf
    d = torch.sub(logp, x.old.to(dtype)).mul_(mf)  # (logp - old) m: 0 under the mask
    ratio = torch.exp(d)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    g = ratio * adv  # r A, then -r A off the clip
    pg = ratio.clamp(lo, hi).mul_(adv)
    pg = torch.minimum(g, pg, out=pg).neg_()
    clipped = ((adv > 0) & (ratio > hi)).logical_or_((adv < 0) & (ratio < lo))
    del adv
    g.masked_fill_(clipped, 0).neg_()
    stats = [clipped.sum().to(dtype), torch.dot(ratio, mf), d.sum().neg()]
    del ratio, clipped
    stats.append(k3_and_grad(d, need_grad=False)[0].sum())
    return pg, g, stats


def _clipped_surrogate_cpp(x, mf, coef, cfg):
    """(loss, g = coef * d pg / d logp, the four token totals) of `_clipped_surrogate` + its coefficient
    in one C++ pass over float32 tokens (csrc/policy_loss.cpp): the same gradient bits (same float32
    ops; ratio is still torch.exp), the loss and totals summed in double."""
    f32 = torch.float32
    d = torch.sub(x.logp.detach().to(f32), x.old.to(f32)).mul_(mf)  # (logp - old) m: 0 under the mask
    ratio = torch.exp(d)
    adv = (x.adv.to(f32) * mf).contiguous()
    mf, coef = mf.contiguous(), coef.contiguous()
    g = torch.empty_like(d)
    loss, clipped, ratio_sum, d_sum, approx_kl = _kl._C.ppo_clip_f32(
        d.data_ptr(), ratio.data_ptr(), adv.data_ptr(), coef.data_ptr(), mf.data_ptr(), d.numel(),
        1.0 - cfg.eps_low, 1.0 + cfg.eps_high, g.data_ptr())
    totals = torch.tensor([loss, clipped, ratio_sum, -d_sum, approx_kl], dtype=f32)
    return totals[0], g, list(totals[1:].unbind())


def policy_loss_fast(x, layout: Layout, cfg, num_tokens: Optional[Number],
                     num_seqs: Optional[Number]):
    """`policy_loss_general` for `fast_path_applies` in fewer passes and no graph: values and the
    per-token gradients in one sweep under no_grad, one `_Presolved` node.

    The surrogate's gradient comes from `_clipped_surrogate` (float32 on the CPU: its C++ twin,
    `_clipped_surrogate_cpp`), k3 and its gradient from one pass (`kl.k3_and_grad`), each times
    its term's coefficient. Masked inputs are zeroed by a multiply; a non-finite result
    (garbage under the mask, or a real inf) returns None and the caller runs the general path,
    which keeps padding out with where().
    """
    dtype = torch.float64 if x.logp.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        mf = x.mask.to(dtype)
        tokens = _token_counts(x.mask, layout, dtype)
        cache: Dict[str, torch.Tensor] = {}
        coef = _coefficients(cfg.aggregation, mf, tokens, layout, cfg, num_tokens, num_seqs, cache)
        if _kl._C is not None and dtype == torch.float32:  # the extension (kl._C: None without it)
            loss, g_logp, (clipped, ratio, ppo_kl, approx_kl) = _clipped_surrogate_cpp(x, mf, coef, cfg)
        else:
            pg, g_logp, (clipped, ratio, ppo_kl, approx_kl) = _clipped_surrogate(x, mf, dtype, cfg)
            loss = torch.dot(pg, coef)
            del pg
            g_logp.mul_(coef)
        zero = torch.zeros((), dtype=dtype, device=mf.device)
        kl_sum = zero
        if x.ref is not None:
            d_ref = torch.sub(x.logp.detach().to(dtype), x.ref.to(dtype)).mul_(mf)
            if cfg.beta == 0:  # the metric only: the configured estimator
                kl_sum = kl_from_delta(d_ref, cfg.kl_kind, cfg.kl_clamp, cfg.kl_value_clamp).sum()
            else:
                kl_ref, g_kl = k3_and_grad(d_ref)
                del d_ref
                c_kl = _coefficients(cfg.kl_aggregation, mf, tokens, layout, cfg, num_tokens, num_seqs, cache)
                loss = loss + cfg.beta * torch.dot(kl_ref, c_kl)
                g_logp.add_(g_kl.mul_(c_kl), alpha=cfg.beta)
                kl_sum = kl_ref.sum()
                del g_kl, kl_ref
        ent = None if x.entropy is None else x.entropy.detach().to(dtype) * mf
        g_ent = None
        if cfg.c_ent > 0:
            c_e = _coefficients(cfg.entropy_aggregation, mf, tokens, layout, cfg, num_tokens, num_seqs, cache)
            loss = loss - cfg.c_ent * torch.dot(ent, c_e)
            g_ent = c_e * -cfg.c_ent
        count = tokens.sum()
        sums = torch.stack([count, clipped, ratio, ppo_kl, kl_sum, zero if ent is None else ent.sum(), count,
                            approx_kl, zero])
        if not bool(torch.isfinite(torch.cat([sums, loss.view(1)])).all()):
            return None
    loss = _Presolved.apply(x.logp, x.entropy, loss, g_logp, g_ent)
    return loss, sums.float(), tokens.float()
