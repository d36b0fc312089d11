"""Each policy-gradient algorithm's defining property, through the stage's loss, on a hand-computed case.

The case: two sampled sequences with 2 and 3 completion tokens (max_new_tokens L_max = 4),
sequence advantages A = (+1, -0.5), and chosen ratios r_t = exp(logp_t - old_t) (old log-probs
set to logp - delta). Each test checks the loss against a number worked out by hand and the
gradient (w.r.t. the model's parameters) against the written-out objective.
"""
import math

import pytest
import torch

from fusedrl.data.batch import IGNORE_INDEX
from fusedrl.data.packed import Example, build_batch
from fusedrl.models.causal_lm import token_logprobs
from fusedrl.rollout.experience import Experience, Rollout
from fusedrl.stages.base import StepTotals
from tests.helpers import rl_tiny as T

ADV = (1.0, -0.5)
LENGTHS = (2, 3)


def _case(algo, deltas):
    """(stage, model, batch, logp with grad, positions of each sequence's completion tokens)."""
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    stage = T.pg_stage(tok, algo=algo, rollout=T.rollout_cfg(max_new_tokens=4, temperature=1.0))
    a, b, c = (tok.convert_tokens_to_ids(x) for x in "abc")
    docs = [[tok.bos_token_id, a, b, c], [tok.bos_token_id, b, a, c, a]]  # prompts of 2 tokens
    examples = [Example(d, [IGNORE_INDEX] * 2 + d[2:]) for d in docs]
    batch = build_batch(examples, [0, 1])
    trained = (batch.labels != IGNORE_INDEX).nonzero().squeeze(1).tolist()
    positions = [trained[:LENGTHS[0]], trained[LENGTHS[0]:]]
    logp = token_logprobs(model, batch, stage.rollout.temperature)
    advantages, old = torch.zeros_like(logp), logp.detach().clone()
    for i, pos in enumerate(positions):
        advantages[pos] = ADV[i]
        old[pos] = old[pos] - torch.tensor(deltas[i], dtype=old.dtype)
    batch.extras.update(advantages=advantages, old_logp=old)
    return stage, model, batch, logp, positions


def _check(stage, model, batch, hand_loss, expected_value):
    totals = StepTotals(tokens=float(sum(LENGTHS)), sequences=2.0, groups=2.0)
    loss, _ = stage.loss(model, batch, totals)
    assert loss.item() == pytest.approx(expected_value, abs=1e-5)
    assert hand_loss.item() == pytest.approx(expected_value, abs=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(hand_loss, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def _ratios(logp, batch, positions):
    return [torch.exp(logp[p] - batch.extras["old_logp"][p]) for p in positions]


def test_dapo_token_mean_with_clip_higher():
    """DAPO: every token weighs the same (token mean) and the upper clip is 1 + 0.28, not 1 + 0.2."""
    # r = 1.25 on the first token of the positive sequence: inside DAPO's clip, outside GRPO's.
    stage, model, batch, logp, pos = _case("dapo", ([math.log(1.25), 0.0], [0.0, 0.0, 0.0]))
    assert (stage.opt.eps_low, stage.opt.eps_high, stage.opt.aggregation) == (0.2, 0.28, "token_mean")
    r1, r2 = _ratios(logp, batch, pos)
    per_token = [-torch.minimum(r * a, r.clamp(0.8, 1.28) * a) for r, a in zip((r1, r2), ADV)]
    hand = (per_token[0].sum() + per_token[1].sum()) / 5
    # by hand: -(1 * (1.25 + 1) + (-0.5) * 3) / 5 = -0.15  (GRPO's clip would give -(2.2 - 1.5) / 5)
    _check(stage, model, batch, hand, -0.15)


def test_dr_grpo_divides_by_the_fixed_length_and_not_by_the_std():
    """Dr. GRPO: A = R - mean (no std), each sequence's sum divided by L_max, not by its own length."""
    stage, model, batch, logp, pos = _case("dr_grpo", ([0.0, 0.0], [0.0, 0.0, 0.0]))
    r1, r2 = _ratios(logp, batch, pos)
    hand = ((-r1 * ADV[0]).sum() / 4 + (-r2 * ADV[1]).sum() / 4) / 2
    # by hand: ((-1 * 2) / 4 + (0.5 * 3) / 4) / 2 = -0.0625  (seq_mean would give -0.25)
    _check(stage, model, batch, hand, -0.0625)
    rollout = Rollout(prompt_ids=[[1]] * 4, completion_ids=[[5], [5], [5], [5]], sampler_logp=[[0.0]] * 4,
                      finished=[True] * 4, record_index=[0] * 4, completions=["a"] * 4, group_size=4,
                      rewards=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    exp = Experience.from_rollout(rollout)
    stage._advantages(exp, rollout)
    torch.testing.assert_close(exp.seq["advantages"], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_gspo_clips_the_sequence_ratio_not_the_token_ratios():
    """GSPO: one ratio per sequence, s_i = exp(mean_t log r_t), clipped to [1 - 3e-4, 1 + 4e-4]."""
    # sequence 1: token ratios e^0.1, e^-0.1 (each far outside GSPO's clip) but s_1 = 1: not clipped.
    # sequence 2: s_2 = e^0.3 with A < 0: the unclipped side, -s A = 0.5 e^0.3.
    stage, model, batch, logp, pos = _case("gspo", ([0.1, -0.1], [0.3, 0.3, 0.3]))
    r1, r2 = _ratios(logp, batch, pos)
    seq = [torch.exp(torch.log(r).mean()) for r in (r1, r2)]
    terms = [-torch.minimum(s * a, s.clamp(1 - 3e-4, 1 + 4e-4) * a) for s, a in zip(seq, ADV)]
    hand = (terms[0] + terms[1]) / 2  # seq_mean of per-token terms that are equal within a sequence
    _check(stage, model, batch, hand, (-1.0 + 0.5 * math.exp(0.3)) / 2)


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """CISPO: l_t = -sg(min(r_t, 1 + 5)) A logp_t: a token at r = 10 still pushes with weight 6 (PPO: 0)."""
    stage, model, batch, logp, pos = _case("cispo", ([math.log(10.0), 0.0], [0.0, 0.0, 0.0]))
    r1, r2 = _ratios(logp, batch, pos)
    weights = [r.detach().clamp(0.0, 6.0) for r in (r1, r2)]
    lp = [logp[p] for p in pos]
    hand = -(weights[0] * ADV[0] * lp[0]).sum() / 5 - (weights[1] * ADV[1] * lp[1]).sum() / 5
    assert weights[0].tolist() == pytest.approx([6.0, 1.0])  # the clipped token keeps weight 6
    expected = -(6.0 * lp[0][0] + lp[0][1] - 0.5 * lp[1].sum()).item() / 5
    _check(stage, model, batch, hand, expected)


def test_sapo_gates_softly():
    """SAPO: l_t = -g(r_t) A with g(r) = sigmoid(tau (r - 1)) 4 / tau (tau 1 for A >= 0, 1.05 below):
    on-policy g'(1) = 1 (the policy gradient); at r = 3 the weight decays smoothly, never to 0."""
    stage, model, batch, logp, pos = _case("sapo", ([math.log(3.0), 0.0], [0.0, 0.0, 0.0]))
    r1, r2 = _ratios(logp, batch, pos)
    gate = lambda r, tau: torch.sigmoid(tau * (r - 1)) * 4 / tau  # noqa: E731
    hand = (-(gate(r1, 1.0) * ADV[0]).sum() - (gate(r2, 1.05) * ADV[1]).sum()) / 5
    sig = 1 / (1 + math.exp(-2.0))
    # by hand: -(4 sig(2) + 2) / 5 for sequence 1, +0.5 * 3 * 2 / 1.05 / 5 for sequence 2
    _check(stage, model, batch, hand, -(4 * sig + 2.0) / 5 + 0.5 * 3 * 2 / 1.05 / 5)
    slope = 4 * sig * (1 - sig) * 3.0  # d g / d logp at r = 3: g'(r) r
    assert 0.0 < slope < 3.0
