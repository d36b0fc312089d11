"""nn.Module wrappers vs plain float64 PyTorch formulas (TRL's), values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from fusedrl.integrations import (FusedLinearCrossEntropyLoss, FusedLinearDPOLoss, FusedLinearGRPOLoss,
                                  FusedLinearLogprobs, FusedPolicyLoss)
from fusedrl.kernels import policy_loss
from tests.conftest import assert_close


def _data(seed=0, b=4, t=7, hdim=12, vocab=53):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, hdim, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=gen, dtype=torch.float64) / 2).requires_grad_()
    y = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.ones(b, t)
    mask[1, 5:] = 0
    mask[3, :2] = 0
    return h, w, y, mask, gen


def _logp(h, w, y):
    return torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None])[..., 0]


def _check_grads(loss, expected, leaves, name):
    g = torch.autograd.grad(loss, leaves, retain_graph=True)
    e = torch.autograd.grad(expected, leaves)
    assert_close(loss.detach(), expected.detach(), atol=1e-9, rtol=1e-8, name=name)
    for a, b in zip(g, e):
        assert_close(a, b, atol=1e-9, rtol=1e-8, name=f"{name} grad")


def test_linear_logprobs_and_cross_entropy():
    h, w, y, mask, _ = _data()
    y = y.masked_fill(mask == 0, -100)
    logp = FusedLinearLogprobs()(h, w, y)
    exact = _logp(h, w, y.clamp(min=0)) * (y != -100)
    _check_grads(logp.sum(), exact.sum(), (h, w), "logp")
    ce = F.cross_entropy((h @ w.T).reshape(-1, 53), y.reshape(-1), ignore_index=-100)
    _check_grads(FusedLinearCrossEntropyLoss()(w, h, y), ce, (h, w), "ce mean")
    ce_sum = F.cross_entropy((h @ w.T).reshape(-1, 53), y.reshape(-1), ignore_index=-100, reduction="sum")
    _check_grads(FusedLinearCrossEntropyLoss(reduction="sum")(w, h, y), ce_sum, (h, w), "ce sum")


def _trl_grpo(logp, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len, num_items):
    """TRL 1.16's GRPO loss (token-level IS, no bias-corrected KL), written out."""
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if beta:
        per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_len)
    return (per_token * mask).sum() / num_items


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_module_matches_trl_formula(loss_type, beta):
    h, w, y, mask, gen = _data(seed=1)
    logp_now = _logp(h, w, y).detach()
    old = logp_now + 0.3 * torch.randn(logp_now.shape, generator=gen, dtype=torch.float64)
    ref = logp_now + 0.2 * torch.randn(logp_now.shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(4, generator=gen, dtype=torch.float64)
    module = FusedLinearGRPOLoss(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                 max_completion_length=9)
    num_items = 30.0 if loss_type == "dapo" else None
    loss, metrics = module(h, w, y, mask, adv, ref_per_token_logps=ref if beta else None,
                           old_per_token_logps=old, num_items_in_batch=num_items)
    expected = _trl_grpo(_logp(h, w, y), old, ref, adv, mask, loss_type, beta, 0.2, 0.28, 9, num_items)
    _check_grads(loss, expected, (h, w), f"grpo {loss_type}")
    assert "entropy" in metrics and "clip_frac" in metrics


def test_policy_loss_module_is_policy_loss():
    gen = torch.Generator().manual_seed(2)
    logp = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    old, adv = logp.detach() + 0.1, torch.randn(3, generator=gen, dtype=torch.float64)
    got = FusedPolicyLoss("gspo", eps_low=0.1, aggregation="seq_mean")(logp, old, adv)[0]
    assert got.item() == policy_loss(logp, old, adv, algo="gspo", eps_low=0.1, aggregation="seq_mean")[0].item()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero", "apo_down"])
def test_dpo_module_matches_formula(loss_type):
    h, w, y, mask, gen = _data(seed=3)
    y = y.masked_fill(mask == 0, -100)
    ref_h = h.detach() + 0.1 * torch.randn(h.shape, generator=gen, dtype=torch.float64)
    loss, metrics = FusedLinearDPOLoss(beta=0.2, loss_type=loss_type)(w, h, y, ref_input=ref_h)

    def seq(hh):
        return (_logp(hh, w, y.clamp(min=0)) * (y != -100)).sum(-1)
    pol, ref = seq(h), seq(ref_h).detach()
    lc, lr = pol[:2] - ref[:2], pol[2:] - ref[2:]
    if loss_type == "sigmoid":
        expected = -F.logsigmoid(0.2 * (lc - lr)).mean()
    elif loss_type == "ipo":
        expected = ((lc - lr - 1 / (2 * 0.2)) ** 2).mean()
    elif loss_type == "apo_zero":
        expected = (1 - torch.sigmoid(0.2 * lc) + torch.sigmoid(0.2 * lr)).mean()  # TRL's value
    else:
        expected = (torch.sigmoid(0.2 * lc) + 1 - torch.sigmoid(0.2 * (lc - lr))).mean()
    _check_grads(loss, expected, (h, w), f"dpo {loss_type}")
    assert set(metrics) >= {"accuracy", "margin"}


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearGRPOLoss(loss_type="cispo")
    with pytest.raises(ValueError, match="max_completion_length"):
        FusedLinearGRPOLoss(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearDPOLoss(loss_type="hinge")
    with pytest.raises(ValueError, match="reduction"):
        FusedLinearCrossEntropyLoss(reduction="none")
    h, w, y, _, _ = _data()
    with pytest.raises(ValueError, match="ref_input"):
        FusedLinearDPOLoss()(w, h, y)
    with pytest.raises(ValueError, match="_input"):
        FusedLinearDPOLoss(use_ref_model=False)(w, h[:3], y[:3])
