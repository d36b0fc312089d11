"""Advantage estimators: hand values, GAE (Triton interpreter vs a per-sequence loop), shaping, bad input."""
import math

import pytest
import torch

from fusedrl.kernels import (RunningMeanBaseline, dr_grpo_advantages, fold_kl_into_rewards, force_backend, gae,
                             grpo_advantages, overlong_reward_shaping, reinforce_advantages, rloo_advantages, whiten)
from tests.conftest import assert_close


def test_grpo_hand_and_layouts():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # group [1, 0]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = sqrt(0.5); A = +-0.5 / (sqrt(0.5) + 1e-4)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    expected = torch.tensor([a, -a, -a, a])
    assert_close(grpo_advantages(rewards, 2), expected)
    assert_close(grpo_advantages(rewards.view(2, 2)), expected.view(2, 2))
    # eps configurable: eps = 1 -> 0.5 / (sqrt(0.5) + 1)
    assert_close(grpo_advantages(rewards, 2, eps=1.0)[0], torch.tensor(0.5 / (math.sqrt(0.5) + 1)))
    # a group with equal rewards gives 0, not NaN
    assert_close(grpo_advantages(torch.ones(3), 3), torch.zeros(3))


def test_dr_grpo_rloo_reinforce_hand():
    assert_close(dr_grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3), torch.tensor([-1.0, 0.0, 1.0]))
    # RLOO on [1, 2, 3, 6]: A_0 = 1 - (2 + 3 + 6) / 3 = -8/3, A_3 = 6 - (1 + 2 + 3) / 3 = 4
    out = rloo_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    # A_1 = 2 - (1 + 3 + 6) / 3 = -4/3, A_2 = 3 - (1 + 2 + 6) / 3 = 0
    assert_close(out, torch.tensor([[-8 / 3, -4 / 3, 0.0, 4.0]]))
    assert_close(reinforce_advantages(torch.tensor([1.0, 3.0]), 0.5), torch.tensor([0.5, 2.5]))
    assert_close(reinforce_advantages(torch.tensor([1.0, 3.0])), torch.tensor([1.0, 3.0]))


def test_running_mean_baseline():
    base = RunningMeanBaseline()
    # first batch: b = 0 -> A = R; then b = mean(1, 3) = 2
    assert_close(base.advantages(torch.tensor([1.0, 3.0])), torch.tensor([1.0, 3.0]))
    # second batch [4]: A = 4 - 2 = 2; b = (1 + 3 + 4) / 3 = 8/3
    assert_close(base.advantages(torch.tensor([4.0])), torch.tensor([2.0]))
    assert_close(base.mean, torch.tensor(8 / 3, dtype=torch.float64))
    ema = RunningMeanBaseline(decay=0.5)
    ema.advantages(torch.tensor([1.0, 3.0]))
    ema.advantages(torch.tensor([4.0]))  # b = 0.5 * 2 + 0.5 * 4 = 3
    assert_close(ema.mean, torch.tensor(3.0, dtype=torch.float64))


def test_whiten_over_masked_tokens():
    values = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # masked population [1, 2, 3]: mean 2, variance (1 + 0 + 1) / 3 = 2/3
    s = 1 / math.sqrt(2 / 3 + 1e-8)
    assert_close(whiten(values, mask), torch.tensor([[-s, 0.0], [s, 0.0]]))
    assert_close(whiten(values, mask, shift_mean=False), torch.tensor([[-s + 2, 2.0], [s + 2, 0.0]]))


def call_gae(backend, *args, **kwargs):
    """gae on one backend: Triton on CUDA tensors when a GPU exists, else under the interpreter."""
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    move = lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
    with force_backend(backend):
        return gae(*map(move, args), **{k: move(v) for k, v in kwargs.items()})


def _gae_loop(rewards, values, lengths, gamma, lam):
    """Independent oracle: plain Python over each sequence, float64."""
    adv, ret, start = [], [], 0
    for n in lengths:
        r, v = rewards[start:start + n].tolist(), values[start:start + n].tolist()
        a, out = 0.0, [0.0] * n
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            a = r[t] + gamma * next_v - v[t] + gamma * lam * a
            out[t] = a
        adv += out
        ret += [x + y for x, y in zip(out, v)]
        start += n
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gae_hand(backend):
    # r = [0, 0, 1], V = 0.5, gamma 1, lam 0.5: d = [0, 0, 0.5];
    # A_2 = 0.5, A_1 = 0 + 0.5 * 0.5 = 0.25, A_0 = 0.125; G = A + V = [0.625, 0.75, 1.0]
    adv, ret = call_gae(backend, torch.tensor([0.0, 0.0, 1.0]), torch.full((3,), 0.5),
                        cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), gamma=1.0, lam=0.5)
    assert_close(adv, torch.tensor([0.125, 0.25, 0.5]))
    assert_close(ret, torch.tensor([0.625, 0.75, 1.0]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gae_packed_vs_loop(backend, seed):
    lengths = [3, 0, 5, 1, 4]
    total = sum(lengths)
    rewards, values = torch.randn(total), torch.randn(total)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    adv, ret = call_gae(backend, rewards, values, cu_seqlens=cu, gamma=0.99, lam=0.95)
    exp_adv, exp_ret = _gae_loop(rewards.double(), values.double(), lengths, 0.99, 0.95)
    assert adv.dtype == torch.float32
    assert_close(adv, exp_adv, atol=1e-5, rtol=1e-5, name="advantages")
    assert_close(ret, exp_ret, atol=1e-5, rtol=1e-5, name="returns")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gae_padded_mask_matches_packed(backend, seed):
    lengths = [2, 4, 3]
    rewards, values = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    adv, ret = call_gae(backend, rewards, values, mask, gamma=0.9, lam=0.8)
    adv, ret = adv.cpu(), ret.cpu()
    exp_adv, exp_ret = _gae_loop(rewards[mask].double(), values[mask].double(), lengths, 0.9, 0.8)
    assert_close(adv[mask], exp_adv, atol=1e-5, rtol=1e-5)
    assert_close(ret[mask], exp_ret, atol=1e-5, rtol=1e-5)
    assert bool((adv[~mask] == 0).all()) and bool((ret[~mask] == 0).all())


def test_overlong_shaping_hand():
    # L_max 20, L_cache 4: penalty clip((len - 16) / 4, 0, 1) = [0, 0.25, 0.5, 1, 1]
    out = overlong_reward_shaping(torch.ones(5), torch.tensor([10, 17, 18, 20, 25]), max_len=20, cache_len=4)
    assert_close(out, torch.tensor([1.0, 0.75, 0.5, 0.0, 0.0]))


def test_fold_kl_padded_and_packed():
    logp = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # row 0: k1 = [0.5, -1.0, (masked)], r_t = -0.1 * k1 = [-0.05, 0.1, 0], reward 2 lands on t = 1
    # row 1: nothing masked in -> no reward anywhere
    out = fold_kl_into_rewards(torch.tensor([2.0, 5.0]), logp, ref, mask, beta=0.1)
    expected = torch.tensor([[-0.05, 2.1, 0.0], [0.0, 0.0, 0.0]])
    assert_close(out, expected)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    packed = fold_kl_into_rewards(torch.tensor([2.0, 5.0]), logp.view(-1), ref.view(-1), mask.view(-1),
                                  cu_seqlens=cu, beta=0.1)
    assert_close(packed, expected.view(-1))


def test_bad_input():
    with pytest.raises(ValueError, match="group_size is required"):
        grpo_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        grpo_advantages(torch.ones(4), 3)
    with pytest.raises(ValueError, match="pass group_size or group_ids, not both"):
        rloo_advantages(torch.ones(3), 3, group_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="singleton must be one of"):
        grpo_advantages(torch.ones(3), 3, singleton="one")
    with pytest.raises(TypeError, match="rewards must have dtype"):
        dr_grpo_advantages(torch.ones(4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="values must have rewards' shape"):
        gae(torch.ones(4), torch.ones(5), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal the number of tokens 4"):
        gae(torch.ones(4), torch.ones(4), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must have dtype in \\(int32\\)"):
        gae(torch.ones(4), torch.ones(4), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        gae(torch.ones(4), torch.ones(4), cu_seqlens=torch.tensor([0, 3, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="lam must be a number in"):
        gae(torch.ones(2, 2), torch.ones(2, 2), lam=1.5)
    with pytest.raises(ValueError, match="cache_len must be <= max_len"):
        overlong_reward_shaping(torch.ones(2), torch.ones(2), max_len=4, cache_len=8)
    with pytest.raises(ValueError, match=r"seq_rewards must be \(2,\)"):
        fold_kl_into_rewards(torch.ones(3), torch.ones(2, 3), torch.ones(2, 3), beta=0.1)
    with pytest.raises(ValueError, match="decay must be None or in"):
        RunningMeanBaseline(decay=1.0)
