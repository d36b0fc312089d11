"""Value, reward-model and preference losses (docs/objectives.md), each returning (loss, metrics).

All math in float32 (float64 for float64 inputs); metrics are detached 0-d
tensors (no host sync). Batch means divide by the batch size unless a global
normaliser (`num_tokens=` / `num_pairs=` / `num_rankings=`) is passed, so
gradient accumulation over micro-batches equals the big batch.

    value (PPO)    0.5 * max((V - G)^2, (clip(V, V_old - eps_v, V_old + eps_v) - G)^2), masked token mean
    Bradley-Terry  -log sigmoid(r_c - r_r [- m])              (m: optional margin, Llama 2)
    Plackett-Luce  -sum_k [ r_s(k) - logsumexp_{j >= k} r_s(j) ]   (scores given best first)
    outcome RM     per-token BCE(logit_t, label of the sequence) over completion tokens

The preference (direct alignment) losses live in `preference.py` and are
re-exported here.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ._rl_layout import Number, batch_mean, check_normaliser, flat_mask, make_layout, per_token_or_seq, segment_sum
from ._validate import FLOAT_DTYPES, check_tensor
from .preference import (apo_down_loss, apo_zero_loss, cdpo_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss,
                         rpo_loss, simpo_loss)
from .preference_pairs import (alphapo_loss, aot_loss, bco_pair_loss, cpo_loss, discopop_loss, dpo_norm_loss,
                               exo_pair_loss, hinge_loss, nca_pair_loss, robust_dpo_loss, sequence_logprobs,
                               sppo_hard_loss, wpo_loss, wpo_weights)
from ._ranges import op_range

Metrics = Dict[str, torch.Tensor]

__all__ = [
    "value_loss", "bradley_terry_loss", "plackett_luce_loss", "outcome_rm_loss",
    "dpo_loss", "cdpo_loss", "ipo_loss", "simpo_loss", "orpo_loss", "kto_loss",
    "apo_zero_loss", "apo_down_loss", "rpo_loss", "dpo_norm_loss", "hinge_loss", "robust_dpo_loss", "bco_pair_loss",
    "sppo_hard_loss", "nca_pair_loss", "exo_pair_loss", "aot_loss", "discopop_loss", "wpo_loss", "wpo_weights",
    "cpo_loss", "alphapo_loss", "sequence_logprobs",
]


def _dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _same_shape(name: str, value, like: torch.Tensor, like_name: str) -> torch.Tensor:
    check_tensor(name, value, dtypes=FLOAT_DTYPES)
    if value.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(value.shape)}")
    return value


@op_range("value_loss")
def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    eps_v: Optional[float] = 0.2,
    num_tokens: Optional[Number] = None,
    aggregation: str = "token_mean",
    cu_seqlens: Optional[torch.Tensor] = None,
    max_len: Optional[int] = None,
    num_seqs: Optional[Number] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Clipped PPO value loss, aggregated as the policy loss (masked token mean by default).

    Args:
        values: (...) float, V_t of the current value model (differentiable).
        old_values: (...) float, V_t at rollout time; returns: (...) float targets G_t.
        mask: None or (...) per-token mask (nonzero entries count).
        eps_v: clip range around old_values; None disables clipping (plain 0.5 (V - G)^2).
        num_tokens: global token count for gradient accumulation (default: this batch's).
        aggregation: "token_mean" | "seq_mean" | "seq_sum" | "seq_mean_fixed_len" (verl's
            loss_agg_mode for the critic; see `policy_loss`). The sequence modes need values
            (B, T) padded or (total,) packed with cu_seqlens; "seq_mean_fixed_len" needs max_len.
        num_seqs: global sequence count for the sequence modes (default: this batch's B).
    Returns:
        loss (0-d), metrics {"vf_clip_frac", "value_mean", "value_error"} (0-d tensors;
        vf_clip_frac: share of tokens where the clipped term is the larger one).
    """
    check_tensor("values", values, dtypes=FLOAT_DTYPES)
    _same_shape("old_values", old_values, values, "values")
    _same_shape("returns", returns, values, "values")
    if eps_v is not None and (isinstance(eps_v, bool) or not isinstance(eps_v, (int, float)) or eps_v <= 0):
        raise ValueError(f"eps_v must be None or a positive number, got {eps_v!r}")
    check_normaliser("num_tokens", num_tokens)
    m = torch.ones_like(values, dtype=torch.bool) if mask is None else _mask_like(mask, values)
    dtype = _dtype(values)
    v = values.to(dtype)
    old = old_values.detach().to(dtype)
    g = returns.detach().to(dtype)
    unclipped = (v - g) ** 2
    if eps_v is None:
        per_token, clipped_wins = 0.5 * unclipped, torch.zeros_like(m)
    else:
        clipped = (torch.clamp(v, old - eps_v, old + eps_v) - g) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipped_wins = clipped > unclipped
    zero = torch.zeros((), dtype=dtype, device=v.device)
    per_token = torch.where(m, per_token, zero)
    count = m.sum().clamp(min=1)
    if aggregation == "token_mean":
        loss = per_token.sum() / (count if num_tokens is None else num_tokens)
    else:
        loss = _sequence_aggregate(per_token, m, aggregation, cu_seqlens, max_len, num_seqs)
    with torch.no_grad():
        metrics = {
            "vf_clip_frac": (clipped_wins & m).sum() / count,
            "value_mean": torch.where(m, v, zero).sum() / count,
            "value_error": torch.where(m, unclipped, zero).sum() / count,
        }
    return loss, metrics


def _sequence_aggregate(per_token, m, aggregation, cu_seqlens, max_len, num_seqs) -> torch.Tensor:
    """The policy loss's sequence modes applied to a masked per-token loss."""
    from ._policy_config import AGGREGATIONS
    from .policy_loss import _aggregate_one

    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "seq_mean_fixed_len" and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                                or max_len < 1):
        raise ValueError(f"aggregation 'seq_mean_fixed_len' needs max_len, a positive int; got {max_len!r}")
    check_normaliser("num_seqs", num_seqs)
    layout = make_layout(per_token, cu_seqlens, name="values")
    sums = segment_sum(per_token.reshape(-1), layout)
    tokens = segment_sum(m.reshape(-1).to(per_token.dtype), layout)
    return _aggregate_one(sums, tokens, layout, aggregation, max_len, None, num_seqs)


def _mask_like(mask, like: torch.Tensor) -> torch.Tensor:
    check_tensor("mask", mask)
    if mask.shape != like.shape:
        raise ValueError(f"mask must have the per-token shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    return mask != 0


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> Metrics:
    with torch.no_grad():
        return {
            "accuracy": (chosen > rejected).to(chosen.dtype).mean(),
            "margin": (chosen - rejected).mean(),
            "chosen_reward": chosen.mean(),
            "rejected_reward": rejected.mean(),
        }


@op_range("bradley_terry_loss")
def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: Optional[torch.Tensor] = None,
    num_pairs: Optional[Number] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Pairwise reward-model loss -log sigmoid(r_c - r_r - m), mean over pairs.

    Args:
        chosen_rewards, rejected_rewards: (P,) float scalar scores of each pair.
        margin: None, or (P,) float margin m from the rating gap (Llama 2 margin loss).
        num_pairs: global pair count for gradient accumulation (default P).
    Returns: loss (0-d), metrics {"accuracy", "margin", "chosen_reward", "rejected_reward"}.
    """
    check_tensor("chosen_rewards", chosen_rewards, dtypes=FLOAT_DTYPES, ndim=1)
    _same_shape("rejected_rewards", rejected_rewards, chosen_rewards, "chosen_rewards")
    check_normaliser("num_pairs", num_pairs)
    dtype = _dtype(chosen_rewards, rejected_rewards)
    diff = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    if margin is not None:
        diff = diff - _same_shape("margin", margin, chosen_rewards, "chosen_rewards").detach().to(dtype)
    loss = batch_mean(-F.logsigmoid(diff), num_pairs)
    return loss, _pair_metrics(chosen_rewards.to(dtype), rejected_rewards.to(dtype))


@op_range("plackett_luce_loss")
def plackett_luce_loss(
    scores: torch.Tensor,
    ranking: Optional[torch.Tensor] = None,
    *,
    num_rankings: Optional[Number] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """K-wise Plackett-Luce loss -sum_k [r_s(k) - logsumexp_{j >= k} r_s(j)], mean over prompts.

    Args:
        scores: (P, K) float reward-model scores of K completions per prompt.
        ranking: None when each row of scores is already ordered best first, else
            (P, K) int64 permutation: ranking[p, k] = index of the k-th best completion.
        num_rankings: global prompt count for gradient accumulation (default P).
    Returns: loss (0-d), metrics {"accuracy" (share of adjacent pairs in order), "margin"
        (mean best - worst score)}.
    """
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES, ndim=2)
    if scores.shape[1] < 2:
        raise ValueError(f"scores must rank K >= 2 completions, got shape {tuple(scores.shape)}")
    check_normaliser("num_rankings", num_rankings)
    ordered = scores.to(_dtype(scores))
    if ranking is not None:
        check_tensor("ranking", ranking, dtypes=(torch.int64, torch.int32))
        if ranking.shape != scores.shape:
            raise ValueError(f"ranking must have scores' shape {tuple(scores.shape)}, got {tuple(ranking.shape)}")
        ordered = ordered.gather(1, ranking.long())
    # logsumexp over the suffix j >= k: flip, cumulative logsumexp, flip back
    suffix = torch.logcumsumexp(ordered.flip(1), dim=1).flip(1)
    per_prompt = -(ordered - suffix).sum(dim=1)
    with torch.no_grad():
        metrics = {
            "accuracy": (ordered[:, :-1] > ordered[:, 1:]).to(ordered.dtype).mean(),
            "margin": (ordered[:, 0] - ordered[:, -1]).mean(),
        }
    return batch_mean(per_prompt, num_rankings), metrics


@op_range("outcome_rm_loss")
def outcome_rm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    labels_layout: Optional[str] = None,
    num_tokens: Optional[Number] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Outcome reward model: per-token BCE against the sequence's 0/1 label, masked token mean.

    Args:
        logits: (B, T) padded or (total,) packed float per-token logits of "correct".
        labels: (B,) per-sequence 0/1 labels (float or int), or per-token of logits' shape.
        mask: None or per-token mask of logits' shape (completion tokens nonzero).
        cu_seqlens: (B + 1,) int32 when packed.
        labels_layout: "sequence" (labels (B,)), "token" (labels per token) or None: read from
            labels' shape, which raises ValueError when both fit (a packed batch with as many
            tokens as sequences); pass it explicitly then.
        num_tokens: global token count for gradient accumulation.
    Returns: loss (0-d), metrics {"accuracy" (token sign agrees with label), "prob_mean"}.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    layout = make_layout(logits, cu_seqlens, name="logits")
    check_tensor("labels", labels)
    check_normaliser("num_tokens", num_tokens)
    dtype = _dtype(logits)
    target = per_token_or_seq("labels", labels.to(dtype), layout, labels_layout, "labels_layout")
    m = flat_mask(mask, layout)
    z = logits.reshape(-1).to(dtype)
    bce = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    zero = torch.zeros((), dtype=dtype, device=z.device)
    count = m.sum().clamp(min=1)
    loss = torch.where(m, bce, zero).sum() / (count if num_tokens is None else num_tokens)
    with torch.no_grad():
        hit = ((z > 0) == (target > 0.5)) & m
        metrics = {"accuracy": hit.sum() / count, "prob_mean": torch.where(m, torch.sigmoid(z), zero).sum() / count}
    return loss, metrics
