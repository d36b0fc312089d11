"""The preference family: each loss against a transcription of its peer's formula written here (TRL's
DPOTrainer / CPOTrainer / ORPOTrainer, OpenRLHF's KTO), value and gradient in float64, a few hand
values, and the fused path (sequence_logprobs from hidden states, no logits) on a packed batch with an
empty and a one-token sequence."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from fusedrl.kernels import (alphapo_loss, aot_loss, bco_pair_loss, cpo_loss, discopop_loss, dpo_loss, dpo_norm_loss,
                             exo_pair_loss, hinge_loss, ipo_loss, kto_loss, nca_pair_loss, orpo_loss,
                             robust_dpo_loss, rpo_loss, sequence_logprobs, simpo_loss, sppo_hard_loss, wpo_loss)
from tests.conftest import assert_close

F64 = torch.float64
P = 6


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 9, (P,), generator=g)
    lr = torch.randint(1, 9, (P,), generator=g)
    c = -torch.rand(P, generator=g, dtype=F64) * lc - 0.1
    r = -torch.rand(P, generator=g, dtype=F64) * lr - 0.1
    return dict(c=c, r=r, rc=c + 0.5 * torch.randn(P, generator=g, dtype=F64),
                rr=r + 0.5 * torch.randn(P, generator=g, dtype=F64), lc=lc, lr=lr)


def trl_dpo(loss_type, c, r, rc, rr, beta, ls=0.0, tau=0.05):
    """TRL DPOTrainer.dpo_loss, transcribed (per-pair losses)."""
    logits = (c - r) - (rc - rr)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    if loss_type == "robust":
        return (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    if loss_type == "exo_pair":
        ls = ls or 1e-3
        return (beta * logits).sigmoid() * (F.logsigmoid(beta * logits) - math.log(1 - ls)) + \
            (-beta * logits).sigmoid() * (F.logsigmoid(-beta * logits) - math.log(ls))
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "sppo_hard":
        a, b = c - rc, r - rr
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "nca_pair":
        cr, rj = (c - rc) * beta, (r - rr) * beta
        return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rj)
    if loss_type in ("aot_pair", "aot"):
        if loss_type == "aot_pair":
            delta = torch.sort(c - rc, dim=0)[0] - torch.sort(r - rr, dim=0)[0]
        else:
            delta = torch.sort(c - r, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
        return -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
    if loss_type == "discopop":
        lg = logits * beta
        mod = torch.sigmoid(lg / tau)
        return -F.logsigmoid(lg) * (1 - mod) + torch.exp(-lg) * mod
    raise KeyError(loss_type)


def check(fn, expected_fn, b, up=0.8):
    """Value and gradients w.r.t. the policy log-probs of `fn` against `expected_fn` (same leaves)."""
    c0, r0 = b["c"].clone().requires_grad_(), b["r"].clone().requires_grad_()
    expected = expected_fn(c0, r0)
    g_exp = torch.autograd.grad(expected * up, [c0, r0])
    c1, r1 = b["c"].clone().requires_grad_(), b["r"].clone().requires_grad_()
    loss, metrics = fn(c1, r1)
    g = torch.autograd.grad(loss * up, [c1, r1])
    assert_close(loss, expected, name="loss")
    assert_close(g[0], g_exp[0], name="dchosen")
    assert_close(g[1], g_exp[1], name="drejected")
    return metrics


PAIRWISE = [
    ("sigmoid", dpo_loss, {}), ("robust", robust_dpo_loss, {"label_smoothing": 0.2}),
    ("exo_pair", exo_pair_loss, {"label_smoothing": 0.0}), ("hinge", hinge_loss, {}),
    ("sppo_hard", sppo_hard_loss, {}), ("nca_pair", nca_pair_loss, {}), ("aot_pair", aot_loss, {}),
    ("aot", aot_loss, {"paired": False, "label_smoothing": 0.1}), ("discopop", discopop_loss, {}),
]


@pytest.mark.parametrize("name,fn,kw", PAIRWISE, ids=[p[0] for p in PAIRWISE])
def test_pairwise_losses_match_trl(name, fn, kw):
    b = batch(seed=len(name))
    beta = 0.3
    ls = kw.get("label_smoothing", 0.0)
    check(lambda c, r: fn(c, r, b["rc"], b["rr"], beta=beta, **kw),
          lambda c, r: trl_dpo(name, c, r, b["rc"], b["rr"], beta, ls).mean(), b)


def test_ipo_length_normalised_and_dpo_norm():
    b = batch(seed=1)
    n = lambda x, length: x / length  # noqa: E731  (TRL divides every log-prob by its completion length)
    check(lambda c, r: ipo_loss(c, r, b["rc"], b["rr"], beta=0.2, chosen_len=b["lc"], rejected_len=b["lr"]),
          lambda c, r: trl_dpo("ipo", n(c, b["lc"]), n(r, b["lr"]), n(b["rc"], b["lc"]), n(b["rr"], b["lr"]),
                               0.2).mean(), b)
    check(lambda c, r: dpo_norm_loss(c, r, b["rc"], b["rr"], b["lc"], b["lr"], beta=0.2),
          lambda c, r: trl_dpo("sigmoid", n(c, b["lc"]), n(r, b["lr"]), n(b["rc"], b["lc"]), n(b["rr"], b["lr"]),
                               0.2).mean(), b)


def test_bco_pair_with_running_delta():
    b = batch(seed=2)
    delta = 0.37

    def trl(c, r):  # TRL "bco_pair": delta = running mean of the rewards
        cr, rj = (c - b["rc"]) * 0.1, (r - b["rr"]) * 0.1
        return (-F.logsigmoid(cr - delta) - F.logsigmoid(-(rj - delta))).mean()

    m = check(lambda c, r: bco_pair_loss(c, r, b["rc"], b["rr"], beta=0.1, delta=delta), trl, b)
    assert_close(m["reward_mean"], torch.cat([(b["c"] - b["rc"]) * 0.1, (b["r"] - b["rr"]) * 0.1]).mean())


def test_wpo_weights_and_loss():
    b = batch(seed=3)
    adj_c, adj_r = -0.2 * b["lc"].double(), -0.3 * b["lr"].double()

    def trl(c, r):
        with torch.no_grad():  # TRL: weights from the length-averaged adjusted log-probs, clamped at 1
            w = torch.clamp(torch.exp((c - adj_c) / b["lc"] + (r - adj_r) / b["lr"]), max=1)
        return (trl_dpo("sigmoid", c, r, b["rc"], b["rr"], 0.1) * w).mean()

    check(lambda c, r: wpo_loss(c, r, b["rc"], b["rr"], b["lc"], b["lr"], chosen_adjust=adj_c,
                                rejected_adjust=adj_r), trl, b)


def test_simpo_cpo_alphapo_match_trl_cpo():
    b = batch(seed=4)
    avg = lambda x, length: x / length  # noqa: E731

    def trl_cpo(c, r, loss_type, beta, gamma=0.5, alpha=0.0, ls=0.0, cpo_alpha=0.0):
        """TRL CPOTrainer.cpo_loss (+ cpo_alpha * the chosen NLL, a token mean over the batch)."""
        c_raw = c
        if loss_type == "simpo":
            c, r = avg(c, b["lc"]), avg(r, b["lr"])
        if alpha != 0:
            c, r = (1 - torch.exp(c).pow(-alpha)) / alpha, (1 - torch.exp(r).pow(-alpha)) / alpha
        logits = c - r
        if loss_type == "simpo":
            logits = logits - gamma / beta
        loss = (-F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls).mean()
        return loss + cpo_alpha * (-c_raw.sum() / b["lc"].sum())

    check(lambda c, r: simpo_loss(c, r, b["lc"], b["lr"], beta=2.0, gamma=0.5, label_smoothing=0.1),
          lambda c, r: trl_cpo(c, r, "simpo", 2.0, ls=0.1), b)
    check(lambda c, r: alphapo_loss(c, r, b["lc"], b["lr"], beta=2.0, gamma=0.5, alpha=0.25, label_smoothing=0.1),
          lambda c, r: trl_cpo(c, r, "simpo", 2.0, alpha=0.25, ls=0.1), b)
    check(lambda c, r: alphapo_loss(c, r, b["lc"], b["lr"], alpha=0.0),
          lambda c, r: simpo_loss(c, r, b["lc"], b["lr"])[0], b)
    check(lambda c, r: cpo_loss(c, r, b["lc"], beta=0.1, alpha=1.0, label_smoothing=0.05),
          lambda c, r: trl_cpo(c, r, "sigmoid", 0.1, ls=0.05, cpo_alpha=1.0), b)


def test_rpo_orpo_nll_modes():
    b = batch(seed=5)
    dpo = lambda c, r: trl_dpo("sigmoid", c, r, b["rc"], b["rr"], 0.1).mean()  # noqa: E731
    # TRL rpo_alpha: the NLL is the cross-entropy over the batch's chosen tokens: sum(-logp_c) / sum(len_c)
    check(lambda c, r: rpo_loss(c, r, b["rc"], b["rr"], b["lc"], alpha=0.5, nll="token_mean"),
          lambda c, r: dpo(c, r) + 0.5 * (-c.sum() / b["lc"].sum()), b)
    check(lambda c, r: rpo_loss(c, r, b["rc"], b["rr"], b["lc"], alpha=0.5),
          lambda c, r: dpo(c, r) + 0.5 * (-c / b["lc"]).mean(), b)

    def trl_orpo(c, r, nll_sum, nll_len):
        ac, ar = c / b["lc"], r / b["lr"]
        log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
        return -nll_sum.sum() / nll_len.sum() - (0.1 * F.logsigmoid(log_odds)).mean()

    prompt_logp = -torch.rand(P, dtype=F64) * 3  # prompt tokens' log-prob sums, 4 tokens each
    check(lambda c, r: orpo_loss(c, r, b["lc"], b["lr"], nll="token_mean"),
          lambda c, r: trl_orpo(c, r, c, b["lc"]), b)
    check(lambda c, r: orpo_loss(c, r, b["lc"], b["lr"], nll="token_mean", nll_logp=c + prompt_logp,
                                 nll_len=b["lc"] + 4),
          lambda c, r: trl_orpo(c, r, c + prompt_logp, b["lc"] + 4), b)


def test_kto_reference_kl_with_and_without_gradient():
    logp = torch.tensor([-1.0, -2.0], dtype=F64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.5], dtype=F64)
    kl_p = torch.tensor([-1.0, -3.0], dtype=F64, requires_grad=True)
    kl_r = torch.tensor([-1.8, -3.0], dtype=F64)  # z0 = mean(0.8, 0) = 0.4
    good = torch.tensor([True, False])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # desirable r = 0.5: 1 - sig(0.1 (0.5 - 0.4)); undesirable r = -0.5: 1 - sig(0.1 (0.4 + 0.5))
    value = (1 - sig(0.01) + 1 - sig(0.09)) / 2
    for grad in (False, True):
        loss, m = kto_loss(logp, ref, good, kl_policy_logp=kl_p, kl_ref_logp=kl_r, kl_grad=grad)
        assert_close(loss, torch.tensor(value, dtype=F64))
        (g,) = torch.autograd.grad(loss, kl_p, allow_unused=True, materialize_grads=True)
        # dL/dz0 = (-0.1 s(1 - s) at 0.01 + 0.1 s(1 - s) at 0.09) / 2; dz0/dkl_p = 1/2 each
        dz0 = (0.1 * sig(0.01) * (1 - sig(0.01)) - 0.1 * sig(0.09) * (1 - sig(0.09))) / 2
        assert_close(g, torch.full((2,), dz0 / 2 if grad else 0.0, dtype=F64), name=f"kl_grad={grad}")


def test_fused_sequence_logprobs_no_logits(monkeypatch):
    """sequence_logprobs: packed hidden states (an empty and a one-token sequence among them) -> sums equal
    to explicit float64 logits, gradients too; it goes through linear_logprobs only."""
    g = torch.Generator().manual_seed(0)
    lengths = [3, 0, 1, 4, 2]
    n, hdim, vocab = sum(lengths), 8, 23
    hidden = torch.randn(n, hdim, generator=g, dtype=F64)
    weight = torch.randn(vocab, hdim, generator=g, dtype=F64) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[4] = -100  # a prompt token in the 4-token sequence (positions 4..7)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    pp = importlib.import_module("fusedrl.kernels.logprobs")
    calls = []
    real = pp.linear_logprobs
    monkeypatch.setattr(pp, "linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    h1 = hidden.clone().requires_grad_()
    sums, lens = sequence_logprobs(h1, weight, labels, cu)
    assert calls == [1]
    h0 = hidden.clone().requires_grad_()
    logp = torch.log_softmax(h0 @ weight.T, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    logp = torch.where(labels != -100, logp, 0.0)
    expected = torch.stack([logp[int(cu[i]):int(cu[i + 1])].sum() for i in range(len(lengths))])
    assert_close(lens, torch.tensor([3.0, 0.0, 1.0, 3.0, 2.0], dtype=lens.dtype))
    assert_close(sums, expected)
    # a preference loss on the fused sums (pairs (0, 2) and (3, 4), the empty sequence left out)
    ref = expected.detach() + 0.1
    for fn in (dpo_loss, hinge_loss, discopop_loss, sppo_hard_loss):
        up = torch.tensor(0.9, dtype=F64)
        ours = fn(sums[[0, 3]], sums[[2, 4]], ref[[0, 3]], ref[[2, 4]])[0]
        theirs = fn(expected[[0, 3]], expected[[2, 4]], ref[[0, 3]], ref[[2, 4]])[0]
        assert_close(ours, theirs)
        assert_close(torch.autograd.grad(ours, h1, up, retain_graph=True)[0],
                     torch.autograd.grad(theirs, h0, up, retain_graph=True)[0], name=fn.__name__)


def test_bad_input():
    b = batch()
    with pytest.raises(ValueError, match="label_smoothing must be < 0.5"):
        robust_dpo_loss(b["c"], b["r"], b["rc"], b["rr"], label_smoothing=0.5)
    with pytest.raises(ValueError, match="nll must be one of"):
        rpo_loss(b["c"], b["r"], b["rc"], b["rr"], b["lc"], nll="sum")
    with pytest.raises(ValueError, match="chosen_len and rejected_len must be given together"):
        ipo_loss(b["c"], b["r"], b["rc"], b["rr"], chosen_len=b["lc"])
    with pytest.raises(ValueError, match="nll_logp and nll_len must be given together"):
        orpo_loss(b["c"], b["r"], b["lc"], b["lr"], nll_logp=b["c"])
    with pytest.raises(TypeError, match="delta must be a number"):
        bco_pair_loss(b["c"], b["r"], b["rc"], b["rr"], delta="x")
    with pytest.raises(ValueError, match="tau must be in"):
        discopop_loss(b["c"], b["r"], b["rc"], b["rr"], tau=0.0)
