"""The policy-gradient loss family (algorithms.md, "Policy losses"), returning (loss, metrics).

Per token (ratio_t = exp(logp_t - old_t), A_t the advantage, clip(.) = clamp to
[1 - eps_low, 1 + eps_high]):

    ppo / grpo  l_t = -min(ratio_t A_t, clip(ratio_t) A_t); dual clip c: for A_t < 0, l_t = min(l_t, -c A_t)
    gspo        the same with the sequence ratio s_i = exp(mean_t over mask (logp_t - old_t)) for every token
    cispo       l_t = -sg(clip(ratio_t)) A_t logp_t
    sapo        l_t = -g(ratio_t) A_t, g(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos if A_t >= 0 else tau_neg
    reinforce   l_t = -A_t logp_t   (alias "rloo")
    then        l_t += beta * KL_t(logp, ref) ; l_t -= c_ent * entropy_t
                l_t *= w_t = min(exp(old_t - sampler_t), is_cap)   (detached; only with sampler_logp)

Aggregation over B sequences (|y_i| = masked tokens of sequence i):

    token_mean          sum_{i,t} l_it / sum_i |y_i|          (normaliser: num_tokens= when given)
    seq_mean            (1/B) sum_i (1/|y_i|) sum_t l_it      (B: num_seqs= when given)
    seq_mean_fixed_len  (1/B) sum_i (1/max_len) sum_t l_it

A sequence with no masked token contributes 0 to every mode (its 1/|y_i| is
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

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ._autocast import autocast_aware
from . import _dispatch
from ._rl_layout import (Layout, Number, check_normaliser, check_token_tensor, flat_mask, make_layout,
                         per_token_or_seq, segment_sum)
from ._validate import FLOAT_DTYPES, check_tensor
from .kl import check_clamp, check_kl_kind, kl_from_delta

ALGOS = ("ppo", "grpo", "gspo", "cispo", "sapo", "reinforce", "rloo")
AGGREGATIONS = ("token_mean", "seq_mean", "seq_mean_fixed_len")
STATS = ("tokens", "clipped", "ratio", "approx_kl", "kl_ref", "entropy", "is_weight")


def _number(name: str, value, *, low: float, strict: bool = True, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if (value <= low) if strict else (value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Validated options of `policy_loss` (see its docstring for each field)."""

    algo: str = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    beta: float = 0.0
    kl_kind: str = "k3"
    kl_clamp: Optional[float] = None
    c_ent: float = 0.0
    is_cap: float = 2.0
    aggregation: str = "token_mean"
    max_len: Optional[int] = None

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        _number("eps_low", self.eps_low, low=0.0, strict=False)
        _number("eps_high", self.eps_high, low=0.0, strict=False)
        _number("dual_clip", self.dual_clip, low=1.0, allow_none=True)
        if self.dual_clip is not None and self.algo not in ("ppo", "grpo", "gspo"):
            raise ValueError(f"dual_clip applies to algo ppo/grpo/gspo only, got algo={self.algo!r}")
        _number("tau_pos", self.tau_pos, low=0.0)
        _number("tau_neg", self.tau_neg, low=0.0)
        _number("beta", self.beta, low=0.0, strict=False)
        check_kl_kind(self.kl_kind, "kl_kind")
        check_clamp(self.kl_clamp, "kl_clamp")
        _number("c_ent", self.c_ent, low=0.0, strict=False)
        _number("is_cap", self.is_cap, low=0.0)
        if self.aggregation == "seq_mean_fixed_len":
            if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1:
                raise ValueError(f"aggregation 'seq_mean_fixed_len' needs max_len, a positive int; got {self.max_len!r}")

    @property
    def algo_code(self) -> int:
        """0 clipped surrogate, 1 gspo, 2 cispo, 3 sapo, 4 reinforce (the Triton constexpr)."""
        return {"ppo": 0, "grpo": 0, "gspo": 1, "cispo": 2, "sapo": 3, "reinforce": 4, "rloo": 4}[self.algo]


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


def policy_loss_reference(x: FlatInputs, layout: Layout, cfg: PolicyLossConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence loss sums (B,) (differentiable) and stats (len(STATS), B) (detached), via autograd."""
    dtype = torch.float64 if x.logp.dtype == torch.float64 else torch.float32
    m = x.mask
    mf = m.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.logp.device)

    def clean(t):  # masked positions read as 0 so padding garbage (inf, NaN) cannot leak in
        return None if t is None else torch.where(m, t.to(dtype), zero)

    logp, old, adv = clean(x.logp), clean(x.old).detach(), clean(x.adv).detach()
    ref, ent, sampler = clean(x.ref), clean(x.entropy), clean(x.sampler)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    ratio = torch.exp(logp - old)
    tokens = segment_sum(mf, layout)
    code = cfg.algo_code
    if code <= 1:
        r = ratio
        if code == 1:
            seq_log_ratio = segment_sum(mf * (logp - old), layout) / tokens.clamp(min=1)
            r = torch.exp(seq_log_ratio)[layout.seq_ids]
        pg = torch.maximum(-r * adv, -r.clamp(lo, hi) * adv)
        if cfg.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -cfg.dual_clip * adv), pg)
        clipped = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
        ratio = r
    else:
        clipped = (ratio > hi) | (ratio < lo)
        if code == 2:
            pg = -ratio.clamp(lo, hi).detach() * adv * logp
        elif code == 3:
            tau = torch.where(adv >= 0, adv.new_tensor(cfg.tau_pos), adv.new_tensor(cfg.tau_neg))
            pg = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        else:
            pg = -adv * logp
    loss = pg
    kl_ref = torch.zeros_like(loss)
    if ref is not None:
        kl_ref = kl_from_delta(logp - ref.detach(), cfg.kl_kind, cfg.kl_clamp)
        loss = loss + cfg.beta * kl_ref
    if ent is not None:
        loss = loss - cfg.c_ent * ent
    weight = torch.ones_like(loss)
    if sampler is not None:
        weight = torch.exp(old - sampler.detach()).clamp(max=cfg.is_cap).detach()
    seq_loss = segment_sum(torch.where(m, weight * loss, zero), layout)
    with torch.no_grad():
        d_old = logp - old
        columns = [tokens, clipped.to(dtype), ratio, torch.expm1(-d_old) + d_old, kl_ref,
                   ent if ent is not None else torch.zeros_like(loss), weight]
        stats = torch.stack([tokens] + [segment_sum(torch.where(m, c, zero), layout) for c in columns[1:]])
    return seq_loss, stats.float()


def aggregate(seq_loss: torch.Tensor, tokens: torch.Tensor, layout: Layout, cfg: PolicyLossConfig,
              num_tokens: Optional[Number], num_seqs: Optional[Number]) -> torch.Tensor:
    """The scalar loss from per-sequence sums (B,) and token counts (B,)."""
    if cfg.aggregation == "token_mean":
        denom = tokens.sum().clamp(min=1) if num_tokens is None else num_tokens
        return seq_loss.sum() / denom
    seqs = max(layout.num_seqs, 1) if num_seqs is None else num_seqs
    if cfg.aggregation == "seq_mean":
        return (seq_loss / tokens.to(seq_loss.dtype).clamp(min=1)).sum() / seqs
    return seq_loss.sum() / cfg.max_len / seqs


def summarise(stats: torch.Tensor, cfg: PolicyLossConfig, has_ref: bool, has_ent: bool,
              has_sampler: bool) -> Dict[str, torch.Tensor]:
    """Metrics (0-d float32 tensors, token means over this micro-batch) from the per-sequence stats."""
    sums = stats.sum(dim=1)
    count = sums[0].clamp(min=1)
    out = {"clip_frac": sums[1] / count, "ratio_mean": sums[2] / count, "approx_kl": sums[3] / count,
           "response_len": stats[0].mean() if stats.shape[1] else sums[0]}
    if has_ref:
        out["kl_ref"] = sums[4] / count
    if has_ent:
        out["entropy"] = sums[5] / count
    if has_sampler:
        out["is_weight_mean"] = sums[6] / count
    return out


def _flatten(logp, old_logp, advantages, mask, ref_logp, entropy, sampler_logp, cu_seqlens, cfg):
    """Validate every input and bring it to the flat normal form."""
    check_tensor("logp", logp, dtypes=FLOAT_DTYPES)
    layout = make_layout(logp, cu_seqlens)
    if old_logp is None:
        old_logp = logp.detach()  # on-policy (one update per rollout): old = sg(logp), ratio 1, gradient of the surrogate
    check_token_tensor("old_logp", old_logp, layout)
    adv = per_token_or_seq("advantages", advantages, layout)
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


@autocast_aware("keep")
def policy_loss(
    logp: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    algo: str = "ppo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: Optional[float] = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    ref_logp: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    kl_kind: str = "k3",
    kl_clamp: Optional[float] = None,
    entropy: Optional[torch.Tensor] = None,
    c_ent: float = 0.0,
    sampler_logp: Optional[torch.Tensor] = None,
    is_cap: float = 2.0,
    aggregation: str = "token_mean",
    max_len: Optional[int] = None,
    num_tokens: Optional[Number] = None,
    num_seqs: Optional[Number] = None,
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
        algo: "ppo" | "grpo" (clipped surrogate) | "gspo" | "cispo" | "sapo" | "reinforce" | "rloo".
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] (DAPO clip-higher: eps_high 0.28;
            CISPO: a large eps_high such as 4 or 5). Also used for the clip_frac metric.
        dual_clip: None or c > 1: for A < 0 the loss is capped at -c A (ppo/grpo/gspo).
        tau_pos, tau_neg: SAPO gate temperatures for A >= 0 and A < 0.
        ref_logp: logp's shape, frozen reference log-probs: the KL penalty (beta > 0) and the kl_ref metric.
        beta: KL coefficient (0 = no penalty); kl_kind: "k1" | "k2" | "k3" | "k3+";
        kl_clamp: None or c: clamp logp - ref_logp to [-c, c] before the estimator.
        entropy: logp's shape, per-token entropies (differentiable): the bonus and the entropy metric.
        c_ent: entropy bonus coefficient (l_t -= c_ent * entropy_t).
        sampler_logp: logp's shape, log-probs of the sampler (e.g. vLLM); enables truncated
            importance weights w_t = min(exp(old_logp - sampler_logp), is_cap), detached,
            multiplying the whole per-token loss.
        is_cap: the truncation C of those weights (2).
        aggregation: "token_mean" | "seq_mean" | "seq_mean_fixed_len" (the last needs max_len).
        max_len: L_max for "seq_mean_fixed_len".
        num_tokens: global token count (host number or tensor) normalising "token_mean" under
            gradient accumulation; default this batch's count.
        num_seqs: global sequence count normalising the two seq modes; default this batch's B.
    Returns:
        loss: 0-d float32 (float64 for float64 logp).
        metrics: dict of detached 0-d float32 tensors, token means over this batch:
            "clip_frac" (tokens whose clip is active: A > 0 and r > 1 + eps_high or A < 0 and
            r < 1 - eps_low for the clipped algos; r outside the range for the others),
            "ratio_mean", "approx_kl" (k3 of logp vs old_logp), "response_len" (mean tokens per
            sequence), and "kl_ref" / "entropy" / "is_weight_mean" when those inputs are given.
    """
    cfg = PolicyLossConfig(algo=algo, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, tau_pos=tau_pos,
                           tau_neg=tau_neg, beta=beta, kl_kind=kl_kind, kl_clamp=kl_clamp, c_ent=c_ent,
                           is_cap=is_cap, aggregation=aggregation, max_len=max_len)
    check_normaliser("num_tokens", num_tokens)
    check_normaliser("num_seqs", num_seqs)
    x, layout = _flatten(logp, old_logp, advantages, mask, ref_logp, entropy, sampler_logp, cu_seqlens, cfg)
    if x.logp.dtype != torch.float64 and _dispatch.use_triton(x.logp, x.old, x.adv):
        from ._policy_loss_triton import policy_loss_triton

        seq_loss, stats = policy_loss_triton(x, layout, cfg)
    else:
        seq_loss, stats = policy_loss_reference(x, layout, cfg)
    loss = aggregate(seq_loss, stats[0], layout, cfg, num_tokens, num_seqs)
    metrics = summarise(stats, cfg, ref_logp is not None, entropy is not None, sampler_logp is not None)
    return loss, metrics
