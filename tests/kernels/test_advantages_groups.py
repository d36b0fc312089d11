"""Group advantages on uneven groups and groups of one, batch std, whitening variants, OPO, MaxRL,
pass@k (against a brute-force enumeration of k-subsets), ReMax, DAPO's overlong factor: hand values
and transcriptions written here."""
import itertools
import math

import pytest
import torch

from fusedrl.kernels import (dr_grpo_advantages, grpo_advantages, maxrl_advantages, opo_advantages,
                             overlong_reward_shaping, passk_advantages, remax_advantages, rloo_advantages, whiten)
from tests.conftest import assert_close

F64 = torch.float64


def t(*v):
    return torch.tensor(v, dtype=F64)


# groups: [1, 0, 1] (ids 7), [5] (id 3, a group of one), [2, 4] (id 9); any id values, any order
REWARDS = t(1.0, 5.0, 0.0, 2.0, 1.0, 4.0)
IDS = torch.tensor([7, 3, 7, 9, 7, 9])


def test_grpo_uneven_groups_and_singletons():
    s0 = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # unbiased std of [1, 0, 1]
    a = 1 / 3 / (s0 + 1e-4)
    b = 1 / (math.sqrt(2) + 1e-4)  # [2, 4]: mean 3, unbiased std sqrt(2)
    assert_close(grpo_advantages(REWARDS, group_ids=IDS), t(a, 0.0, -2 * a, -b, a, b))
    # verl's groups of one: mean 0, std 1
    assert_close(grpo_advantages(REWARDS, group_ids=IDS, singleton="reward")[1], t(5 / (1 + 1e-4))[0])
    # population std, eps inside the root
    s0p = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 3)
    out = grpo_advantages(REWARDS, group_ids=IDS, unbiased=False, eps_mode="sqrt", eps=1e-6)
    assert_close(out[0], t(1 / 3 / math.sqrt(s0p ** 2 + 1e-6))[0])
    assert_close(dr_grpo_advantages(REWARDS, group_ids=IDS), t(1 / 3, 0.0, -2 / 3, -1.0, 1 / 3, 1.0))
    # RLOO: R - mean of the others
    assert_close(rloo_advantages(REWARDS, group_ids=IDS), t(1 - 0.5, 0.0, 0 - 1.0, 2 - 4.0, 1 - 0.5, 4 - 2.0))
    assert_close(rloo_advantages(REWARDS, group_ids=IDS, singleton="reward")[1], t(5.0)[0])


def test_grpo_batch_std_is_trl_scale_rewards_batch():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=g, dtype=F64)
    # TRL: advantages = rewards - group mean; scale_rewards="batch": / (rewards.std() + 1e-4)
    expected = (r.view(3, 4) - r.view(3, 4).mean(1, keepdim=True)).view(-1) / (r.std() + 1e-4)
    assert_close(grpo_advantages(r, 4, std="batch"), expected)
    assert_close(grpo_advantages(r, 4, std="none"), dr_grpo_advantages(r, 4))


def test_whiten_variants():
    values = torch.tensor([[1.0, 2.0], [3.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    # population [1, 2, 3]: mean 2, unbiased variance 1 (verl masked_whiten), population 2/3
    s = 1 / math.sqrt(1 + 1e-8)
    assert_close(whiten(values, mask, unbiased=True), t(-s, 0.0, s, 0.0).view(2, 2))
    assert_close(whiten(values, mask, unbiased=True, eps_mode="std", eps=1e-4),
                 t(-1 / 1.0001, 0.0, 1 / 1.0001, 0.0).view(2, 2))
    assert_close(whiten(values, mask, scale=False), t(-1.0, 0.0, 1.0, 0.0).view(2, 2))
    with pytest.raises(ValueError, match="eps_mode must be"):
        whiten(values, eps_mode="var")


def test_opo_maxrl_remax_hand():
    # OPO: [1, 0] with lengths [2, 6]: baseline (2 * 1 + 6 * 0) / 8 = 0.25
    assert_close(opo_advantages(t(1.0, 0.0), torch.tensor([2, 6]), 2), t(0.75, -0.25))
    assert_close(opo_advantages(t(1.0, 0.0, 3.0), torch.tensor([2, 6, 4]), group_ids=torch.tensor([0, 0, 1])),
                 t(0.75, -0.25, 0.0))
    # MaxRL: [1, 0, 0, 0] mean 0.25 -> (r - 0.25) / 0.25; an all-zero group -> 0
    assert_close(maxrl_advantages(t(1.0, 0.0, 0.0, 0.0, 0.0, 0.0),
                                  group_ids=torch.tensor([0, 0, 0, 0, 1, 1])), t(3.0, -1.0, -1.0, -1.0, 0.0, 0.0))
    assert_close(maxrl_advantages(t(1.0, 1.0, 0.0, 1.0), 2), t(0.0, 0.0, -1.0, 1.0))  # [0, 1]: mean .5 -> -1, 1
    # ReMax: R - R_greedy; greedy per prompt broadcasts over (P, G)
    assert_close(remax_advantages(t(1.0, 0.5), t(0.25, 0.25)), t(0.75, 0.25))
    assert_close(remax_advantages(t(1.0, 0.0, 2.0, 3.0).view(2, 2), t(0.5, 2.0)), t(0.5, -0.5, 0.0, 1.0).view(2, 2))


def passk_bruteforce(group, k):
    """A response's advantage = (mean pass@k of the k-subsets holding it - Rbar) / std, from enumeration."""
    n = len(group)
    subsets = list(itertools.combinations(range(n), k))
    rbar = sum(max(group[j] for j in s) for s in subsets) / len(subsets)
    std = math.sqrt(rbar * (1 - rbar))
    out = []
    for i in range(n):
        holding = [s for s in subsets if i in s]
        mean_i = sum(max(group[j] for j in s) for s in holding) / len(holding)
        out.append(0.0 if std == 0 else (mean_i - rbar) / std)
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_passk_matches_enumeration(k):
    groups = [[1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0, 0, 1, 0]]
    rewards = torch.tensor([x for g in groups for x in g], dtype=F64)
    ids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    expected = t(*[a for g in groups for a in passk_bruteforce(g, k)])
    assert_close(passk_advantages(rewards, k, group_ids=ids), expected)
    if k == 2:  # by hand: [1, 0, 0, 0], k 2: Rbar = 1/2, std 1/2; correct 1, wrong (1/2 - 2/3) / (1/2) = -1/3
        assert_close(passk_advantages(t(1.0, 0.0, 0.0, 0.0), 2, 4), t(1.0, -1 / 3, -1 / 3, -1 / 3))


def test_overlong_factor_and_bad_input():
    # L_max 10, L_cache 4: length 8 is 2 / 4 into the buffer; factor 0.5 -> penalty 0.25
    assert_close(overlong_reward_shaping(t(1.0, 1.0), torch.tensor([8, 12]), max_len=10, cache_len=4, factor=0.5),
                 t(0.75, 0.5))
    with pytest.raises(ValueError, match="factor must be"):
        overlong_reward_shaping(t(1.0), torch.tensor([1]), max_len=10, cache_len=4, factor=-1.0)
    with pytest.raises(ValueError, match="binary"):
        passk_advantages(t(0.5, 1.0), 1, 2)
    with pytest.raises(ValueError, match="exceeds the size of a group"):
        passk_advantages(t(0.0, 1.0), 3, 2)
    with pytest.raises(ValueError, match="group_ids must be"):
        grpo_advantages(t(1.0, 2.0), group_ids=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="std must be one of"):
        grpo_advantages(t(1.0, 2.0), 2, std="global")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps_mode", ["std", "sqrt"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_even_groups_match_the_group_ids_path(dtype, eps_mode, unbiased):
    # contiguous groups take a (groups, G) reduction; the same groups given as group_ids take the scatter path
    from fusedrl.kernels import grpo_advantages

    rewards = torch.randn(7 * 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    ids = torch.arange(35) // 5
    for shape in ((35,), (7, 5)):
        r = rewards.view(shape)
        even = grpo_advantages(r, None if len(shape) == 2 else 5, eps_mode=eps_mode, unbiased=unbiased)
        assert even.shape == r.shape and even.dtype == dtype
        scatter = grpo_advantages(rewards, group_ids=ids, eps_mode=eps_mode, unbiased=unbiased)
        torch.testing.assert_close(even.reshape(-1), scatter, rtol=4 * torch.finfo(dtype).eps, atol=0)
