"""Value, reward-model and preference losses: hand values, float64 gradcheck, accumulation, bad input."""
import math

import pytest
import torch

from fusedrl.kernels import (apo_down_loss, apo_zero_loss, bradley_terry_loss, cdpo_loss, dpo_loss, ipo_loss,
                             kto_loss, orpo_loss, outcome_rm_loss, plackett_luce_loss, rpo_loss, simpo_loss,
                             value_loss)
from tests.conftest import assert_close


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_value_loss_hand():
    # t0: V 1, V_old 0.5, G 0: unclipped 1, clipped (clip(1, .3, .7) = .7)^2 = .49 -> 0.5 * 1 = 0.5
    # t1: V 0, V_old 0.5, G 0: unclipped 0, clipped (0.3)^2 = .09 -> 0.5 * .09 = 0.045 (clip wins)
    # t2 masked out. mean over 2 tokens = 0.2725
    loss, m = value_loss(t(1.0, 0.0, 9.0), t(0.5, 0.5, 0.0), t(0.0, 0.0, 0.0), t(1, 1, 0))
    assert_close(loss, t(0.2725)[0])
    assert_close(m["vf_clip_frac"], torch.tensor(0.5))
    unclipped, _ = value_loss(t(1.0, 0.0), t(0.5, 0.5), t(0.0, 0.0), eps_v=None)
    assert_close(unclipped, t(0.25)[0])  # 0.5 * (1 + 0) / 2


def test_reward_model_hand():
    loss, m = bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.5))
    # pairs: -log sigmoid(1) = log(1 + e^-1), -log sigmoid(-0.5) = log(1 + e^0.5)
    assert_close(loss, t((softplus(-1.0) + softplus(0.5)) / 2)[0])
    assert_close(m["accuracy"], t(0.5)[0])
    assert_close(m["margin"], t(0.25)[0])  # (1 - 0.5) / 2
    loss_m, _ = bradley_terry_loss(t(1.0), t(0.0), margin=t(1.0))  # -log sigmoid(0) = log 2
    assert_close(loss_m, t(math.log(2))[0])
    # Plackett-Luce on [2, 1, 0]: -(2 - lse(2, 1, 0)) - (1 - lse(1, 0)) - 0
    lse3 = math.log(math.e ** 2 + math.e + 1)
    expected = -(2 - lse3) - (1 - math.log(math.e + 1))
    assert_close(plackett_luce_loss(t(2.0, 1.0, 0.0)[None])[0], t(expected)[0])
    # the same ranking given as a permutation of unordered scores [0, 2, 1]
    pl, pm = plackett_luce_loss(t(0.0, 2.0, 1.0)[None], torch.tensor([[1, 2, 0]]))
    assert_close(pl, t(expected)[0])
    assert_close(pm["accuracy"], t(1.0)[0])


def test_outcome_rm_hand_packed_and_padded():
    # sequence 0 label 1, logits [0, 2]: BCE log 2, log(1 + e^-2); sequence 1 label 0, logit [1]: log(1 + e^1)
    expected = (math.log(2) + softplus(-2.0) + softplus(1.0)) / 3
    packed, m = outcome_rm_loss(t(0.0, 2.0, 1.0), t(1, 0), cu_seqlens=torch.tensor([0, 2, 3], dtype=torch.int32))
    assert_close(packed, t(expected)[0])
    assert_close(m["accuracy"], t(1 / 3)[0])  # logit 0 is not > 0; logit 2 right; logit 1 for label 0 wrong
    padded, _ = outcome_rm_loss(t(0.0, 2.0, 1.0, 7.0).view(2, 2), t(1, 0), t(1, 1, 1, 0).view(2, 2))
    assert_close(padded, t(expected)[0])


# chosen -1, rejected -2, refs -1.5, -1.5: log-ratios +0.5 and -0.5, h = 1
PAIR = dict(chosen_logp=t(-1.0), rejected_logp=t(-2.0), ref_chosen_logp=t(-1.5), ref_rejected_logp=t(-1.5))


def test_dpo_family_hand():
    assert_close(dpo_loss(**PAIR)[0], t(softplus(-0.1))[0])  # -log sigmoid(0.1 * 1)
    # cDPO e = 0.1: 0.9 log(1 + e^-0.1) + 0.1 log(1 + e^0.1)
    assert_close(cdpo_loss(**PAIR)[0], t(0.9 * softplus(-0.1) + 0.1 * softplus(0.1))[0])
    assert_close(ipo_loss(**PAIR)[0], t(16.0)[0])  # (1 - 1 / 0.2)^2
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert_close(apo_zero_loss(**PAIR)[0], t(-sig(0.05) + sig(-0.05))[0])  # beta r_c = .05, beta r_r = -.05
    assert_close(apo_down_loss(**PAIR)[0], t(sig(0.05) - sig(0.1))[0])
    # RPO: DPO + 1 * NLL_avg(chosen) = log(1 + e^-0.1) + 1 / 2 (chosen length 2)
    loss, m = rpo_loss(**PAIR, chosen_len=t(2.0))
    assert_close(loss, t(softplus(-0.1) + 0.5)[0])
    _, dm = dpo_loss(**PAIR)
    assert_close(dm["chosen_reward"], t(0.05)[0])
    assert_close(dm["rejected_reward"], t(-0.05)[0])
    assert_close(dm["accuracy"], t(1.0)[0])
    assert_close(dm["margin"], t(0.1)[0])


def test_simpo_orpo_hand():
    # SimPO: avg_c = -2 / 2 = -1, avg_r = -6 / 3 = -2; -log sigmoid(2 * 1 - 0.5) = log(1 + e^-1.5)
    loss, _ = simpo_loss(t(-2.0), t(-6.0), t(2.0), t(3.0))
    assert_close(loss, t(softplus(-1.5))[0])
    # ORPO: lo(a) = a - log(1 - e^a); lo(-1) - lo(-2); loss = 1 (NLL_avg of chosen) - 0.1 log sigmoid(diff)
    lo = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731
    diff = lo(-1.0) - lo(-2.0)
    loss, m = orpo_loss(t(-2.0), t(-6.0), t(2.0), t(3.0))
    assert_close(loss, t(1.0 + 0.1 * softplus(-diff))[0])
    assert_close(m["log_odds_ratio"], t(diff)[0])


def test_kto_hand():
    # r = logp - ref = [1, -1, 2]; desirable [1, 0, 1]; z0 from mismatched pairs: mean([0.5, 1.5]) = 1
    # desirable r=1: 1 - sig(0.1 * 0) = 0.5; undesirable r=-1: 1 - sig(0.1 * (1 + 1)) ; desirable r=2: 1 - sig(0.1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (0.5 + (1 - sig(0.2)) + (1 - sig(0.1))) / 3
    loss, m = kto_loss(t(0.0, -1.0, 1.0), t(-1.0, 0.0, -1.0), torch.tensor([1, 0, 1]),
                       kl_policy_logp=t(0.0, 1.0), kl_ref_logp=t(-0.5, -0.5))
    assert_close(loss, t(expected)[0])
    assert_close(m["kl"], t(1.0)[0])
    assert_close(m["chosen_reward"], t(0.15)[0])  # 0.1 * (1 + 2) / 2
    assert_close(m["rejected_reward"], t(-0.1)[0])
    # a negative KL estimate is clamped to 0
    _, m0 = kto_loss(t(0.0), t(0.0), torch.tensor([1]), kl_baseline=-3.0)
    assert_close(m0["kl"], t(0.0)[0])


PAIRWISE = [
    (dpo_loss, {}), (cdpo_loss, {}), (ipo_loss, {}), (apo_zero_loss, {}), (apo_down_loss, {}),
]


@pytest.mark.parametrize("fn,kw", PAIRWISE)
def test_pairwise_gradcheck(fn, kw, seed):
    c, r = torch.randn(5, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64,
                                                                               requires_grad=True)
    rc, rr = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, rc, rr, **kw)[0], (c, r))


def test_length_normalised_and_rm_gradcheck(seed):
    c = (-torch.rand(5, dtype=torch.float64) * 4 - 0.5).requires_grad_()
    r = (-torch.rand(5, dtype=torch.float64) * 4 - 0.5).requires_grad_()
    lc, lr = torch.randint(1, 6, (5,)), torch.randint(1, 6, (5,))
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, lc, lr)[0], (c, r))
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, lc, lr)[0], (c, r))
    rc, rr = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: rpo_loss(a, b, rc, rr, lc)[0], (c, r))
    assert torch.autograd.gradcheck(lambda a, b: bradley_terry_loss(a, b)[0], (c, r))
    scores = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: plackett_luce_loss(s)[0], (scores,))
    v = torch.randn(7, dtype=torch.float64, requires_grad=True)
    old, g = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: value_loss(x, old, g, eps_v=0.3)[0], (v,))
    desirable = torch.tensor([1, 0, 1, 0, 1])
    assert torch.autograd.gradcheck(lambda a: kto_loss(a, rc, desirable, kl_baseline=0.2)[0], (c,))


def test_global_normaliser_accumulates(seed):
    c, r = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    rc, rr = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    full = dpo_loss(c, r, rc, rr)[0]
    parts = sum(dpo_loss(c[i:i + 2], r[i:i + 2], rc[i:i + 2], rr[i:i + 2], num_pairs=8)[0] for i in range(0, 8, 2))
    assert_close(parts, full)
    v, old, g = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4)
    mask = torch.rand(3, 4) > 0.3
    full_v = value_loss(v, old, g.double(), mask)[0]
    n = int(mask.sum())
    parts_v = sum(value_loss(v[i:i + 1], old[i:i + 1], g[i:i + 1].double(), mask[i:i + 1], num_tokens=n)[0]
                  for i in range(3))
    assert_close(parts_v, full_v)


def test_bad_input():
    with pytest.raises(ValueError, match="rejected_logp must have chosen_logp's shape"):
        dpo_loss(t(1.0, 2.0), t(1.0), t(1.0, 2.0), t(1.0, 2.0))
    with pytest.raises(ValueError, match="beta must be in"):
        dpo_loss(**PAIR, beta=0.0)
    with pytest.raises(ValueError, match="label_noise must be in"):
        cdpo_loss(**PAIR, label_noise=0.7)
    with pytest.raises(ValueError, match=r"returns must have the shape of values \(2,\)"):
        value_loss(t(1.0, 2.0), t(1.0, 2.0), t(1.0))
    with pytest.raises(ValueError, match="eps_v must be None or a positive number"):
        value_loss(t(1.0), t(1.0), t(1.0), eps_v=-0.1)
    with pytest.raises(ValueError, match="ranking must have scores' shape"):
        plackett_luce_loss(torch.randn(2, 3), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be per token"):
        outcome_rm_loss(torch.randn(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="kl_policy_logp and kl_ref_logp must be given together"):
        kto_loss(t(0.0), t(0.0), torch.tensor([1]), kl_policy_logp=t(0.0))
    with pytest.raises(ValueError, match="num_pairs must be > 0"):
        dpo_loss(**PAIR, num_pairs=0)
    with pytest.raises(ValueError, match="desirable must have policy_logp's shape"):
        kto_loss(t(0.0), t(0.0), torch.tensor([1, 0]))


def test_outcome_rm_layout_is_explicit_when_ambiguous():
    # 2 tokens in 2 sequences (the first empty): labels (2,) fit both readings
    cu = torch.tensor([0, 0, 2], dtype=torch.int32)
    logits, labels = t(0.0, 2.0), t(0.0, 1.0)
    per_seq, _ = outcome_rm_loss(logits, labels, cu_seqlens=cu, labels_layout="sequence")
    assert_close(per_seq, t((math.log(2) + softplus(-2.0)) / 2)[0])  # both tokens take sequence 1's label 1
    per_seq0, _ = outcome_rm_loss(logits, t(1.0, 0.0), cu_seqlens=cu, labels_layout="sequence")
    assert_close(per_seq0, t((math.log(2) + softplus(2.0)) / 2)[0])  # sequence 1's label is 0
    per_tok, _ = outcome_rm_loss(logits, t(1.0, 0.0), cu_seqlens=cu, labels_layout="token")
    assert_close(per_tok, t((math.log(2) + softplus(2.0)) / 2)[0])  # token labels 1, 0: log 2 + log(1 + e^2)
    with pytest.raises(ValueError, match="ambiguous.*labels_layout='token' or labels_layout='sequence'"):
        outcome_rm_loss(logits, labels, cu_seqlens=cu)


def test_value_loss_aggregations():
    # packed: seq 0 = 1 token (loss .5 * 1^2), seq 1 empty, seq 2 = 2 tokens (.5 * 2^2, .5 * 3^2; the last masked)
    v = t(1.0, 2.0, 3.0).requires_grad_()
    zeros = t(0.0, 0.0, 0.0)
    cu = torch.tensor([0, 1, 1, 3], dtype=torch.int32)
    mask = t(1, 1, 0)
    expected = {"token_mean": (0.5 + 2.0) / 2, "seq_mean": (0.5 + 0 + 2.0) / 3, "seq_sum": (0.5 + 2.0) / 3,
                "seq_mean_fixed_len": (0.5 + 2.0) / 4 / 3}
    for mode, value in expected.items():
        loss, _ = value_loss(v, v.detach(), zeros, mask, eps_v=None, aggregation=mode, cu_seqlens=cu, max_len=4)
        assert_close(loss, t(value)[0], name=mode)
        (g,) = torch.autograd.grad(loss, v)
        # d/dV of 0.5 V^2 = V, scaled by each mode's normaliser
        scale = {"token_mean": [1 / 2, 1 / 2], "seq_mean": [1 / 3, 1 / 3], "seq_sum": [1 / 3, 1 / 3],
                 "seq_mean_fixed_len": [1 / 12, 1 / 12]}[mode]
        assert_close(g, t(1.0 * scale[0], 2.0 * scale[1], 0.0), name=mode)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        value_loss(v, v, zeros, aggregation="mean", cu_seqlens=cu)
