"""Advantage estimators and reward shaping (docs/objectives.md, "Advantages").

Group layout: rewards of G samples per prompt are either (num_prompts * G,)
grouped contiguously (pass `group_size=G`) or (num_prompts, G). Outputs have
the input's shape, float32 (float64 for float64 input). All outputs are
detached: advantages are targets, not part of the graph.

    GRPO      A_i = (R_i - mean R) / (std R + eps)     (std unbiased, eps = 1e-4; group / batch / no std)
    Dr. GRPO  A_i = R_i - mean R
    RLOO      A_k = R_k - mean_{j != k} R_j = K / (K - 1) (R_k - mean R)
    OPO, MaxRL, pass@k, ReMax: see _group_advantages.py (uneven groups via group_ids; groups of one)
    REINFORCE A_i = R_i - b, b a running mean of past rewards (or 0)
    whiten    (A - mean) / sqrt(var + eps) over masked tokens (population or unbiased variance,
              eps in the root or on the std, or centring only)
    GAE       see _gae.py (`gae` is re-exported here)
    DAPO overlong: r -= factor * clip((len - (L_max - L_cache)) / L_cache, 0, 1)
    KL folding: r_t = -beta * KL_t per token, + the sequence reward on the last token
"""
from __future__ import annotations

from typing import Optional

import torch

from ._rl_layout import flat_mask, make_layout
from ._validate import FLOAT_DTYPES, check_tensor
from ._gae import gae, gae_reference
from ._group_advantages import (group_advantages, maxrl_advantages, opo_advantages, passk_advantages,
                                remax_advantages, rloo_group_advantages)
from .kl import check_kl_kind, kl_from_delta
from ._ranges import op_range

__all__ = [
    "grpo_advantages", "dr_grpo_advantages", "rloo_advantages", "reinforce_advantages",
    "RunningMeanBaseline", "whiten", "gae", "gae_reference", "overlong_reward_shaping",
    "fold_kl_into_rewards", "maxrl_advantages", "opo_advantages", "passk_advantages", "remax_advantages",
]


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


@op_range("grpo_advantages")
def grpo_advantages(rewards, group_size: Optional[int] = None, *, eps: float = 1e-4, group_ids=None,
                    std: str = "group", eps_mode: str = "std", unbiased: bool = True,
                    singleton: str = "zero") -> torch.Tensor:
    """GRPO group normalisation A_i = (R_i - mean R) / (std R + eps).

    Args:
        rewards: (num_prompts * G,) grouped contiguously, or (num_prompts, G); float.
        group_size: G when rewards is 1-D.
        eps: added to the group std (eps_mode "std", TRL / verl) or to the variance under the
            square root (eps_mode "sqrt").
        group_ids: instead of group_size, (N,) int prompt id of each reward: uneven groups.
        std: "group" (each group's std), "batch" (the std of all rewards: TRL scale_rewards="batch"),
            "none" (no scaling: Dr. GRPO).
        unbiased: Bessel-corrected std (TRL, verl) or the population std.
        singleton: a group of one gets A = 0 ("zero") or verl's R / (1 + eps) ("reward").
    Returns: advantages of rewards' shape, float32 (float64 for float64 input).
    """
    return group_advantages(rewards, group_size, group_ids=group_ids, std=std, eps=eps, eps_mode=eps_mode,
                            unbiased=unbiased, singleton=singleton)


@op_range("dr_grpo_advantages")
def dr_grpo_advantages(rewards, group_size: Optional[int] = None, *, group_ids=None,
                       singleton: str = "zero") -> torch.Tensor:
    """Dr. GRPO: A_i = R_i - mean R over the group (no std). Shapes and groups as `grpo_advantages`."""
    return group_advantages(rewards, group_size, group_ids=group_ids, std="none", singleton=singleton)


@op_range("rloo_advantages")
def rloo_advantages(rewards, group_size: Optional[int] = None, *, group_ids=None,
                    singleton: str = "zero") -> torch.Tensor:
    """RLOO leave-one-out baseline: A_k = R_k - mean_{j != k} R_j. Shapes and groups as `grpo_advantages`."""
    return rloo_group_advantages(rewards, group_size, group_ids=group_ids, singleton=singleton)


@op_range("reinforce_advantages")
def reinforce_advantages(rewards, baseline=None) -> torch.Tensor:
    """A_i = R_i - b. rewards (N,) float; baseline None (0), a float, or a tensor broadcastable to rewards."""
    check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES)
    r = _compute(rewards)
    if baseline is None:
        return r.clone()
    if isinstance(baseline, torch.Tensor):
        return r - _compute(baseline).to(r.dtype)
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise TypeError(f"baseline must be None, a number or a tensor, got {type(baseline).__name__}")
    return r - baseline


class RunningMeanBaseline:
    """REINFORCE baseline b: a running mean of all rewards seen so far (device tensor, no host sync).

    `advantages(rewards)` returns R - b using the baseline *before* this batch
    (so b is independent of the current samples), then folds the batch into b.
    With `decay` set, b is an exponential moving average instead:
    b <- decay * b + (1 - decay) * mean(batch).
    """

    def __init__(self, decay: Optional[float] = None):
        if decay is not None and not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ValueError(f"decay must be None or in [0, 1), got {decay!r}")
        self.decay = decay
        self.mean: Optional[torch.Tensor] = None  # 0-d float64
        self.count: Optional[torch.Tensor] = None  # 0-d float64

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES, ndim=1)
        out = reinforce_advantages(rewards, self.mean)
        self.update(rewards)
        return out

    def update(self, rewards: torch.Tensor) -> None:
        r = rewards.detach().double()
        n = torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)
        batch_mean = r.mean()
        if self.mean is None:
            self.mean, self.count = batch_mean, n
        elif self.decay is not None:
            self.mean = self.decay * self.mean + (1 - self.decay) * batch_mean
        else:
            total = self.count + n
            self.mean = self.mean + (batch_mean - self.mean) * n / total
            self.count = total


@op_range("whiten")
def whiten(values: torch.Tensor, mask: Optional[torch.Tensor] = None, *, shift_mean: bool = True,
           eps: float = 1e-8, unbiased: bool = False, eps_mode: str = "sqrt", scale: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the masked entries.

    Args:
        values: (...) float, e.g. per-token advantages (B, T) or (total,).
        mask: None or (...) of values' shape; nonzero entries are the population.
            Masked-out entries come back as 0.
        shift_mean: False adds the mean back after scaling (verl's masked_whiten shift_mean=False).
        eps: 1e-8; eps_mode "sqrt": (x - mean) / sqrt(var + eps) (verl, OpenRLHF); "std":
            (x - mean) / (std + eps) (TRL's 1e-4 on the std).
        unbiased: Bessel-corrected variance (verl's masked_whiten, TRL) or the population one (default).
        scale: False only centres: x - mean.
    Returns: (...) float32 (float64 for float64 input), detached.
    """
    if eps_mode not in ("sqrt", "std"):
        raise ValueError(f"eps_mode must be 'sqrt' or 'std', got {eps_mode!r}")
    check_tensor("values", values, dtypes=FLOAT_DTYPES)
    v = _compute(values)
    if mask is None:
        m = torch.ones_like(v, dtype=torch.bool)
    else:
        check_tensor("mask", mask)
        if mask.shape != values.shape:
            raise ValueError(f"mask must have values' shape {tuple(values.shape)}, got {tuple(mask.shape)}")
        m = mask != 0
    mf = m.to(v.dtype)
    count = mf.sum().clamp(min=1.0)
    mean = (v * mf).sum() / count
    var = (((v - mean) * mf) ** 2).sum() / ((count - 1).clamp(min=1) if unbiased else count)
    if not scale:
        out = v - mean
    elif eps_mode == "sqrt":
        out = (v - mean) * torch.rsqrt(var + eps)
    else:
        out = (v - mean) / (torch.sqrt(var) + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


@op_range("overlong_reward_shaping")
def overlong_reward_shaping(rewards, lengths, *, max_len: int, cache_len: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment: r - factor * clip((len - (L_max - L_cache)) / L_cache, 0, 1).

    Args:
        rewards: (N,) float sequence rewards.
        lengths: (N,) int or float completion lengths.
        max_len: L_max, the generation length limit; cache_len: L_cache in (0, L_max].
        factor: the penalty at L_max (verl's overlong_buffer.penalty_factor, 1.0).
    Returns: (N,) shaped rewards, float32 (float64 for float64 input).
    """
    check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES)
    check_tensor("lengths", lengths)
    if lengths.shape != rewards.shape:
        raise ValueError(f"lengths must have rewards' shape {tuple(rewards.shape)}, got {tuple(lengths.shape)}")
    for name, value in (("max_len", max_len), ("cache_len", cache_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if cache_len > max_len:
        raise ValueError(f"cache_len must be <= max_len={max_len}, got {cache_len}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
        raise ValueError(f"factor must be a number >= 0, got {factor!r}")
    r = _compute(rewards)
    over = (lengths.to(r.dtype) - (max_len - cache_len)) / cache_len
    return r - factor * over.clamp(0.0, 1.0)


@op_range("fold_kl_into_rewards")
def fold_kl_into_rewards(seq_rewards, logp, ref_logp, mask=None, *, cu_seqlens=None, beta: float,
                         kind: str = "k1", clamp: Optional[float] = None) -> torch.Tensor:
    """Per-token rewards r_t = -beta * KL_t, plus the sequence reward on the last masked token.

    PPO / REINFORCE style KL regularisation (docs/objectives.md): the KL goes into the
    reward instead of the loss. A sequence with no masked token gets no reward.

    Args:
        seq_rewards: (B,) float sequence rewards.
        logp, ref_logp: (B, T) padded or (total,) packed per-token log-probs.
        mask: None (all tokens) or per-token mask; nonzero entries are completion tokens.
        cu_seqlens: (B + 1,) int32 when packed.
        beta: KL coefficient >= 0; kind: KL estimator ("k1" by default); clamp: see `kl_penalty`.
    Returns: per-token rewards of logp's shape, float32 (float64 for float64 input), detached.
    """
    check_tensor("logp", logp, dtypes=FLOAT_DTYPES)
    layout = make_layout(logp, cu_seqlens)
    check_tensor("ref_logp", ref_logp, dtypes=FLOAT_DTYPES)
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    check_tensor("seq_rewards", seq_rewards, dtypes=FLOAT_DTYPES)
    if tuple(seq_rewards.shape) != (layout.num_seqs,):
        raise ValueError(f"seq_rewards must be ({layout.num_seqs},), got {tuple(seq_rewards.shape)}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
        raise ValueError(f"beta must be a number >= 0, got {beta!r}")
    check_kl_kind(kind)
    m = flat_mask(mask, layout)
    dtype = torch.float64 if torch.float64 in (logp.dtype, ref_logp.dtype) else torch.float32
    delta = (logp.detach().to(dtype) - ref_logp.detach().to(dtype)).reshape(-1)
    tok = torch.where(m, -beta * kl_from_delta(delta, kind, clamp), torch.zeros_like(delta))
    positions = torch.arange(delta.numel(), device=delta.device)
    marked = torch.where(m, positions, torch.full_like(positions, -1))
    last = torch.full((layout.num_seqs,), -1, dtype=torch.long, device=delta.device)
    last = last.scatter_reduce(0, layout.seq_ids, marked, reduce="amax")
    gain = torch.where(last >= 0, seq_rewards.detach().to(dtype), torch.zeros((), dtype=dtype, device=delta.device))
    tok = tok.index_add(0, last.clamp(min=0), gain)
    return tok.view(layout.shape)
