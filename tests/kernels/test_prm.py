"""PRM math on small cases worked out by hand (the expected numbers are derived in the comments)."""
import math

import pytest
import torch

from fusedrl.kernels.prm import (aggregate_step_scores, prm_loss, solution_accuracy, step_scores, step_targets,
                                 token_rewards)
from tests.conftest import assert_close

I = -100  # ignore_index


def test_step_targets_maps_prm800k_labels():
    raw = torch.tensor([I, -1, 0, 1, I])
    assert step_targets(raw, 3).tolist() == [I, 0, 1, 2, I]
    assert step_targets(raw, 2, neutral_as=1).tolist() == [I, 0, 1, 1, I]
    assert step_targets(raw, 2, neutral_as=0).tolist() == [I, 0, 0, 1, I]


def test_three_class_loss_and_step_accuracy_by_hand():
    # one solution of 5 tokens, steps end at tokens 1, 3, 4
    logits = torch.zeros(1, 5, 3, dtype=torch.float64)
    logits[0, 1] = torch.tensor([0.0, 0.0, math.log(2.0)], dtype=torch.float64)  # softmax (1/4, 1/4, 1/2); label 2 -> CE log 2, right
    logits[0, 3] = torch.tensor([1.0, 0.0, 0.0])  # label 0 -> CE log((e + 2) / e) = log(1 + 2/e), right
    logits[0, 4] = torch.tensor([0.0, 2.0, 0.0])  # label 2 -> CE log(e^2 + 2), wrong (argmax 1)
    logits[0, 0] = 50.0  # not a step end: ignored
    labels = torch.tensor([[I, 2, I, 0, 2]])
    loss, metrics = prm_loss(logits, labels)
    expected = (math.log(2.0) + math.log(1 + 2 / math.e) + math.log(math.e ** 2 + 2)) / 3
    assert abs(float(loss) - expected) < 1e-12
    assert abs(float(metrics["step_accuracy"]) - 2 / 3) < 1e-6 and int(metrics["steps"]) == 3


def test_two_class_loss_and_gradient_only_at_step_ends():
    logits = torch.zeros(4, 2, requires_grad=True)
    labels = torch.tensor([I, 1, I, 0])
    loss, metrics = prm_loss(logits, labels)
    assert abs(float(loss.detach()) - math.log(2.0)) < 1e-6  # uniform over 2 classes: CE log 2 at both steps
    loss.backward()
    # d CE / d logits = softmax - onehot = (0.5 - onehot), / 2 steps
    assert torch.allclose(logits.grad[1], torch.tensor([0.25, -0.25]))
    assert torch.allclose(logits.grad[3], torch.tensor([-0.25, 0.25]))
    assert (logits.grad[[0, 2]] == 0).all()
    assert abs(float(metrics["step_accuracy"]) - 0.5) < 1e-6  # argmax of a tie is class 0: right for label 0 only


def test_scalar_head_bce_by_hand():
    logits = torch.tensor([0.0, math.log(3.0), 2.0, 9.0], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, I])
    # BCE: logit 0, y 1 -> log 2; logit log 3 (p 3/4), y 0 -> -log(1/4) = log 4; logit 2, y 1 -> log(1 + e^-2)
    loss, metrics = prm_loss(logits, labels, head="scalar")
    expected = (math.log(2.0) + math.log(4.0) + math.log(1 + math.exp(-2.0))) / 3
    assert abs(float(loss) - expected) < 1e-12
    # predictions logit > 0: [no, yes, yes] vs labels [1, 0, 1] -> only the third is right
    assert abs(float(metrics["step_accuracy"]) - 1 / 3) < 1e-6


def test_no_step_end_gives_zero_loss_not_nan():
    loss, metrics = prm_loss(torch.randn(3, 2), torch.full((3,), I))
    assert float(loss) == 0.0 and float(metrics["step_accuracy"]) == 0.0


def test_step_scores():
    two = torch.tensor([[0.0, math.log(3.0)]])
    assert_close(step_scores(two), torch.tensor([0.75]), name="2-class good prob")
    three = torch.tensor([[0.0, 0.0, math.log(2.0)]])
    assert_close(step_scores(three), torch.tensor([0.5]), name="3-class good prob")
    assert_close(step_scores(torch.tensor([0.0]), head="scalar"), torch.tensor([0.5]), name="sigmoid")


# padded: two solutions of 5 tokens; solution 0 steps end at 1, 3, 4 with scores 0.9, 0.4, 0.8;
# solution 1 steps end at 0, 2 with scores 0.5, 0.6 (other tokens hold noise that must be ignored)
SCORES = torch.tensor([[0.1, 0.9, 0.2, 0.4, 0.8], [0.5, 0.3, 0.6, 0.0, 0.7]])
MASK = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 1, 0, 0]])


@pytest.mark.parametrize("how,expected", [("min", [0.4, 0.5]), ("prod", [0.9 * 0.4 * 0.8, 0.5 * 0.6]),
                                          ("last", [0.8, 0.6])])
def test_solution_aggregation_padded(how, expected):
    assert_close(aggregate_step_scores(SCORES, MASK, how=how), torch.tensor(expected), name=how)


@pytest.mark.parametrize("how,expected", [("min", [0.4, 1.0, 0.5]), ("prod", [0.288, 1.0, 0.3]),
                                          ("last", [0.8, 1.0, 0.6])])
def test_solution_aggregation_packed_with_empty_solution(how, expected):
    cu = torch.tensor([0, 5, 5, 10], dtype=torch.int32)  # the middle solution has no token: score `empty`
    got = aggregate_step_scores(SCORES.reshape(-1), MASK.reshape(-1), how=how, cu_seqlens=cu)
    assert_close(got, torch.tensor(expected), name=how)


def test_solution_accuracy_by_hand():
    # labels (2 classes, good = 1): solution 0 has a bad step (token 3), solution 1 is all good
    labels = torch.tensor([[I, 1, I, 0, 1], [1, I, 1, I, I]])
    # min: [0.4, 0.5] -> predicted good = [False, False] (0.5 is not > 0.5); truth [False, True] -> 1/2
    assert float(solution_accuracy(SCORES, labels, how="min")) == 0.5
    # last: [0.8, 0.6] -> predicted [True, True]; truth [False, True] -> 1/2
    assert float(solution_accuracy(SCORES, labels, how="last")) == 0.5
    # threshold 0.45 with min: predicted [False, True] -> 2/2
    assert float(solution_accuracy(SCORES, labels, how="min", threshold=0.45)) == 1.0


def test_token_rewards_at_step_ends():
    rewards = token_rewards(SCORES, MASK, baseline=0.5)
    expected = torch.tensor([[0.0, 0.4, 0.0, -0.1, 0.3], [0.0, 0.0, 0.1, 0.0, 0.0]])
    assert_close(rewards, expected, name="token rewards", atol=1e-6, rtol=0)


BAD = [
    (lambda: prm_loss(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)), ValueError, "2 or 3 classes"),
    (lambda: prm_loss(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long)), ValueError, "labels"),
    (lambda: prm_loss(torch.zeros(3, 2), torch.tensor([0, 2, I])), ValueError, "labels"),
    (lambda: prm_loss(torch.zeros(3, 2), torch.zeros(3)), TypeError, "labels"),
    (lambda: prm_loss(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), head="ranker"), ValueError, "head"),
    (lambda: step_targets(torch.tensor([2]), 3), ValueError, "step_labels"),
    (lambda: step_targets(torch.tensor([1]), 4), ValueError, "num_classes"),
    (lambda: aggregate_step_scores(SCORES, MASK, how="mean"), ValueError, "how"),
    (lambda: aggregate_step_scores(SCORES, MASK[:, :3]), ValueError, "step_mask"),
    (lambda: token_rewards(SCORES.long(), MASK), TypeError, "scores"),
]


@pytest.mark.parametrize("call,error,name", BAD)
def test_bad_inputs_are_named(call, error, name):
    with pytest.raises(error, match=name):
        call()
