"""Group-relative advantage estimators on even or uneven groups (re-exported by `advantages`).

Groups are given either as (num_prompts, G) / (num_prompts * G,) + group_size (even), or
as `group_ids` (N,) int, the prompt of each reward (uneven: any sizes, any order; verl's
`index`). Statistics per group g with n_g members (all float64 inside, detached):

    mean_g, std_g (unbiased by default; `unbiased=False` the population std)
    grpo     A = (R - mean_g) / (std + eps)   std: "group" std_g, "batch" the std of all rewards
             (TRL scale_rewards="batch"), "none" (Dr. GRPO); eps_mode "std" adds eps to the std
             (TRL, verl), "sqrt" puts it inside: (R - mean_g) / sqrt(var + eps)
    rloo     A = n_g / (n_g - 1) (R - mean_g) = R - mean of the others
    opo      A = R - sum_g(len R) / sum_g(len)   (length-weighted baseline; Hao et al. 2025, verl "opo")
    maxrl    A = (R - mean_g) / mean_g, 0 where mean_g = 0   (binary rewards; Tajwar et al. 2026)
    pass@k   binary rewards, n_g samples, c correct, Rbar = 1 - C(n - c, k) / C(n, k), s = sqrt(Rbar (1 - Rbar)):
             correct A = (1 - Rbar) / s, wrong A = (1 - Rbar - C(n - c - 1, k - 1) / C(n - 1, k - 1)) / s,
             0 where s = 0   (Chen et al. 2025, "Pass@k Training", the analytic form)
    remax    A = R - R_greedy   (Li et al. 2023: the greedy completion's reward is the baseline)

A group of one (n_g = 1) has no baseline of its own: `singleton="zero"` (default) gives it
A = 0 (it carries no relative signal); `singleton="reward"` gives verl's choice, mean 0 and
std 1 (grpo: R / (1 + eps); rloo, dr_grpo, opo: R).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._validate import FLOAT_DTYPES, check_tensor
from ._ranges import op_range

SINGLETONS = ("zero", "reward")
STD_MODES = ("group", "batch", "none")
EPS_MODES = ("std", "sqrt")


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def group_index(rewards, group_size: Optional[int], group_ids) -> torch.Tensor:
    """(N,) int64 dense group index of every reward (flattened order)."""
    size = even_group_size(rewards, group_size, group_ids)
    if size is None:
        return torch.unique(group_ids, return_inverse=True)[1]
    return torch.arange(rewards.numel(), device=rewards.device) // size


def even_group_size(rewards, group_size: Optional[int], group_ids) -> Optional[int]:
    """Validate the grouping; G for contiguous groups of G, None for uneven ones (group_ids)."""
    check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES)
    if group_ids is not None:
        if group_size is not None:
            raise ValueError("pass group_size or group_ids, not both")
        check_tensor("group_ids", group_ids, dtypes=(torch.int32, torch.int64), ndim=1)
        if rewards.dim() != 1 or group_ids.shape != rewards.shape:
            raise ValueError(f"group_ids must be (N,) like rewards {tuple(rewards.shape)}, "
                             f"got {tuple(group_ids.shape)}")
        return None
    if rewards.dim() == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"group_size={group_size} disagrees with rewards of shape {tuple(rewards.shape)}")
        group_size = rewards.shape[1]
    elif rewards.dim() == 1:
        if group_size is None:
            raise ValueError("group_size is required when rewards is 1-D (num_prompts * G,) (or pass group_ids)")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if rewards.numel() % group_size:
            raise ValueError(f"rewards length {rewards.numel()} is not a multiple of group_size={group_size}")
    else:
        raise ValueError(f"rewards must be (num_prompts * G,) or (num_prompts, G), got shape {tuple(rewards.shape)}")
    return group_size


def group_stats(r: torch.Tensor, idx: torch.Tensor, unbiased: bool = True):
    """Per-element (count, mean, std) of its group; std of a group of one is 0."""
    num = int(idx.max()) + 1 if idx.numel() else 0
    count = torch.zeros(num, dtype=r.dtype, device=r.device).index_add(0, idx, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add(0, idx, r) / count.clamp(min=1)
    sq = torch.zeros_like(count).index_add(0, idx, (r - mean[idx]) ** 2)
    denom = (count - 1).clamp(min=1) if unbiased else count.clamp(min=1)
    return count[idx], mean[idx], torch.sqrt(sq / denom)[idx]


def even_group_stats(r: torch.Tensor, size: int, unbiased: bool = True):
    """group_stats for contiguous groups of `size`: reductions over a (groups, size) view, no scatter."""
    rv = r.view(-1, size)
    mean = rv.mean(dim=1, keepdim=True)
    sq = (rv - mean).square_().sum(dim=1, keepdim=True)
    std = torch.sqrt(sq / max(size - 1 if unbiased else size, 1))
    count = torch.full((1,), float(size), dtype=r.dtype, device=r.device).expand(r.numel())
    return count, mean.expand(-1, size).reshape(-1), std.expand(-1, size).reshape(-1)


def _finish(adv, count, singleton, singleton_value, rewards):
    _choice("singleton", singleton, SINGLETONS)
    alone = count == 1
    adv = torch.where(alone, singleton_value if singleton == "reward" else torch.zeros_like(adv), adv)
    return adv.view(rewards.shape)


def group_advantages(rewards, group_size: Optional[int] = None, *, group_ids=None, std: str = "group",
                     eps: float = 1e-4, eps_mode: str = "std", unbiased: bool = True,
                     singleton: str = "zero") -> torch.Tensor:
    """GRPO-family normalisation (module docstring) on even or uneven groups; rewards' shape, detached."""
    _choice("std", std, STD_MODES)
    _choice("eps_mode", eps_mode, EPS_MODES)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    _choice("singleton", singleton, SINGLETONS)
    size = even_group_size(rewards, group_size, group_ids)
    r = _compute(rewards).reshape(-1)
    if size is not None and size > 1 and std == "group":  # no singletons: (groups, G) math, one (N,) temporary
        rv = r.view(-1, size)
        mean = rv.mean(dim=1, keepdim=True)
        centred = rv - mean
        std_g = torch.sqrt(centred.square().sum(dim=1, keepdim=True) / (size - 1 if unbiased else size))
        scale = std_g + eps if eps_mode == "std" else torch.sqrt(std_g ** 2 + eps)
        return centred.div_(scale).view(rewards.shape)
    if size is None:
        count, mean, std_g = group_stats(r, torch.unique(group_ids, return_inverse=True)[1], unbiased)
    else:
        count, mean, std_g = even_group_stats(r, size, unbiased)
    centred = r - mean
    if std == "none":
        return _finish(centred, count, singleton, r, rewards)
    if std == "batch":
        n = r.numel()
        var = ((r - r.mean()) ** 2).sum() / max(n - 1 if unbiased else n, 1)
        std_g = torch.sqrt(var).expand_as(r)
    scale = std_g + eps if eps_mode == "std" else torch.sqrt(std_g ** 2 + eps)
    one = torch.ones_like(r)
    alone_scale = one + eps if eps_mode == "std" else torch.sqrt(one + eps)
    return _finish(centred / scale, count, singleton, r / alone_scale, rewards)


def rloo_group_advantages(rewards, group_size=None, *, group_ids=None, singleton: str = "zero") -> torch.Tensor:
    """RLOO on even or uneven groups: R - mean of the other members."""
    idx = group_index(rewards, group_size, group_ids)
    r = _compute(rewards).reshape(-1)
    count, mean, _ = group_stats(r, idx)
    adv = count / (count - 1).clamp(min=1) * (r - mean)
    return _finish(adv, count, singleton, r, rewards)


@op_range("opo_advantages")
def opo_advantages(rewards, lengths, group_size=None, *, group_ids=None, singleton: str = "zero") -> torch.Tensor:
    """OPO: A = R - sum_g(len R) / sum_g(len) (length-weighted group baseline). lengths: rewards' shape."""
    idx = group_index(rewards, group_size, group_ids)
    check_tensor("lengths", lengths)
    if lengths.shape != rewards.shape:
        raise ValueError(f"lengths must have rewards' shape {tuple(rewards.shape)}, got {tuple(lengths.shape)}")
    r = _compute(rewards).reshape(-1)
    n = lengths.detach().reshape(-1).to(r.dtype)
    num = int(idx.max()) + 1 if idx.numel() else 0
    wsum = torch.zeros(num, dtype=r.dtype, device=r.device).index_add(0, idx, n * r)
    lsum = torch.zeros(num, dtype=r.dtype, device=r.device).index_add(0, idx, n)
    count, _, _ = group_stats(r, idx)
    adv = r - (wsum / lsum.clamp(min=1e-30))[idx]
    return _finish(adv, count, singleton, r, rewards)


@op_range("maxrl_advantages")
def maxrl_advantages(rewards, group_size=None, *, group_ids=None) -> torch.Tensor:
    """MaxRL: A = (R - mean_g) / mean_g, 0 where the group mean is 0 (binary rewards)."""
    idx = group_index(rewards, group_size, group_ids)
    r = _compute(rewards).reshape(-1)
    _, mean, _ = group_stats(r, idx)
    safe = torch.where(mean == 0, torch.ones_like(mean), mean)
    return torch.where(mean == 0, torch.zeros_like(r), (r - mean) / safe).view(rewards.shape)


def _log_comb(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log C(n, k), -inf where k > n or n < 0 (C = 0)."""
    ok = (k <= n) & (n >= 0) & (k >= 0)
    nn, kk = n.clamp(min=0), k.clamp(min=0)
    val = torch.lgamma(nn + 1) - torch.lgamma(kk + 1) - torch.lgamma((nn - kk).clamp(min=0) + 1)
    return torch.where(ok, val, torch.full_like(val, -math.inf))


@op_range("passk_advantages")
def passk_advantages(rewards, k: int, group_size=None, *, group_ids=None) -> torch.Tensor:
    """Pass@k advantages of binary (0/1) rewards (module docstring); needs 1 <= k <= every group's size."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    idx = group_index(rewards, group_size, group_ids)
    r = _compute(rewards).reshape(-1).double()
    if bool(((r != 0) & (r != 1)).any()):
        raise ValueError("passk_advantages needs binary (0/1) rewards")
    count, mean, _ = group_stats(r, idx)
    if bool((count < k).any()):
        raise ValueError(f"k={k} exceeds the size of a group ({int(count.min())})")
    neg = count - torch.round(mean * count)
    rbar = 1 - torch.exp(_log_comb(neg, torch.full_like(neg, k)) - _log_comb(count, torch.full_like(count, k)))
    s = torch.sqrt(rbar * (1 - rbar))
    miss = torch.exp(_log_comb(neg - 1, torch.full_like(neg, k - 1)) - _log_comb(count - 1,
                                                                                 torch.full_like(count, k - 1)))
    adv = torch.where(r == 1, 1 - rbar, 1 - rbar - miss) / torch.where(s > 0, s, torch.ones_like(s))
    adv = torch.where(s > 0, adv, torch.zeros_like(adv))
    return adv.to(_compute(rewards).dtype).view(rewards.shape)


@op_range("remax_advantages")
def remax_advantages(rewards, greedy_rewards) -> torch.Tensor:
    """ReMax: A = R - R_greedy. greedy_rewards: rewards' shape, or (num_prompts,) for (num_prompts, G) rewards."""
    check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES)
    check_tensor("greedy_rewards", greedy_rewards, dtypes=FLOAT_DTYPES)
    r = _compute(rewards)
    b = _compute(greedy_rewards).to(r.dtype)
    if b.shape == r.shape:
        return r - b
    if r.dim() == 2 and b.shape == (r.shape[0],):
        return r - b[:, None]
    raise ValueError(f"greedy_rewards must have rewards' shape {tuple(r.shape)} or (num_prompts,), "
                     f"got {tuple(b.shape)}")
