"""More direct-alignment losses (TRL DPOTrainer / CPOTrainer loss types and their papers).

Inputs as in `preference.py`: (P,) per-sequence log-prob sums over completion tokens
(policy differentiable, reference constant), lengths (P,) where a loss normalises by
length. With r_c = logp_c - ref_c, r_r = logp_r - ref_r, h = r_c - r_r, e = label smoothing:

    dpo_norm   -log sigmoid(beta h~), h~ of per-token averages logp / len (policy and reference)
    hinge      relu(1 - beta h)                                     (SLiC; TRL "hinge")
    robust     (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)   (Chowdhury et al. 2024)
    bco_pair   -log sigmoid(beta r_c - delta) - log sigmoid(-(beta r_r - delta)), delta a running mean
               of the rewards beta r (TRL "bco_pair"; pass it in, the metric "reward_mean" updates it)
    sppo_hard  (r_c - 1 / (2 beta))^2 + (r_r + 1 / (2 beta))^2      (Wu et al. 2024)
    nca_pair   -log sigmoid(beta r_c) - 0.5 log sigmoid(-beta r_c) - 0.5 log sigmoid(-beta r_r)   (Chen et al. 2024)
    exo_pair   sigmoid(beta h) (log sigmoid(beta h) - log(1 - e)) + sigmoid(-beta h) (log sigmoid(-beta h) - log e),
               e = 1e-3 when 0                                      (Ji et al. 2024)
    aot_pair   DPO's form on delta = sort(r_c) - sort(r_r) over the batch   (Melnyk et al. 2024)
    aot        DPO's form on delta = sort(logp_c - logp_r) - sort(ref_c - ref_r)
    discopop   (1 - m) (-log sigmoid(beta h)) + m exp(-beta h), m = sigmoid(beta h / tau), tau 0.05
               (Chris Lu et al. 2024)
    wpo        w * DPO, w = sg(min(exp(avg_c + avg_r), 1)), avg = (logp - adjust) / len (Zhou et al. 2024;
               TRL use_weighting; its adjust is sum_t log sum_v p_v^2, pass it when available)
    cpo        -(1 - e) log sigmoid(beta (logp_c - logp_r)) - e log sigmoid(-...) + alpha NLL(y_c)   (Xu et al. 2024)
    alphapo    SimPO's form on u = (1 - exp(-alpha avg)) / alpha (avg for alpha = 0)   (Gupta et al. 2025)

AOT sorts within the batch, so its loss over micro-batches is not the big batch's.
All losses are means over the P pairs (or `num_pairs`) with DPO's metrics (beta r_c, beta r_r).
`sequence_logprobs` computes the inputs from final hidden states without building logits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._autocast import autocast_aware
from ._rl_layout import Number, batch_mean, check_normaliser, make_layout, segment_sum
from ._validate import check_tensor
from .preference import Result, _coef, _inputs, _logratios, _metrics, _per_token, nll_term
from ._ranges import op_range


def _smoothed(z, e):
    return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)


def _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs):
    _coef("beta", beta)
    check_normaliser("num_pairs", num_pairs)
    return _logratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)


@op_range("dpo_norm_loss")
@autocast_aware("keep")
def dpo_norm_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, chosen_len, rejected_len, *,
                  beta: float = 0.1, num_pairs: Optional[Number] = None) -> Result:
    """DPO on length-averaged log-probs (policy and reference each divided by the completion length)."""
    lc, lr = _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs)
    lc, lr = _per_token(lc, lr, chosen_len, rejected_len)
    return batch_mean(-F.logsigmoid(beta * (lc - lr)), num_pairs), _metrics(beta * lc, beta * lr)


@op_range("hinge_loss")
@autocast_aware("keep")
def hinge_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
               num_pairs: Optional[Number] = None) -> Result:
    """SLiC hinge: relu(1 - beta h)."""
    lc, lr = _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs)
    return batch_mean(torch.relu(1 - beta * (lc - lr)), num_pairs), _metrics(beta * lc, beta * lr)


@op_range("robust_dpo_loss")
@autocast_aware("keep")
def robust_dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
                    label_smoothing: float = 0.1, num_pairs: Optional[Number] = None) -> Result:
    """Robust DPO: (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e), e in [0, 0.5)."""
    _coef("label_smoothing", label_smoothing, high=0.5, strict=False)
    if label_smoothing == 0.5:
        raise ValueError("label_smoothing must be < 0.5 for the robust loss (it divides by 1 - 2e)")
    lc, lr = _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs)
    z = beta * (lc - lr)
    e = label_smoothing
    per_pair = (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    return batch_mean(per_pair, num_pairs), _metrics(beta * lc, beta * lr)


@op_range("bco_pair_loss")
@autocast_aware("keep")
def bco_pair_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
                  delta=0.0, num_pairs: Optional[Number] = None) -> Result:
    """BCO (paired): -log sigmoid(beta r_c - delta) - log sigmoid(-(beta r_r - delta)).

    delta: the running mean of past rewards beta r (a number or a 0-d tensor, detached); the
    metric "reward_mean" (mean of this batch's beta r_c and beta r_r) is what updates it.
    """
    lc, lr = _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs)
    if isinstance(delta, torch.Tensor):
        delta = delta.detach().to(lc.dtype)
    elif isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise TypeError(f"delta must be a number or a 0-d tensor, got {type(delta).__name__}")
    per_pair = -F.logsigmoid(beta * lc - delta) - F.logsigmoid(-(beta * lr - delta))
    reward_mean = torch.cat([beta * lc, beta * lr]).mean()
    return batch_mean(per_pair, num_pairs), _metrics(beta * lc, beta * lr, reward_mean=reward_mean)


@op_range("sppo_hard_loss")
@autocast_aware("keep")
def sppo_hard_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
                   num_pairs: Optional[Number] = None) -> Result:
    """SPPO (hard labels): (r_c - 1 / (2 beta))^2 + (r_r + 1 / (2 beta))^2."""
    lc, lr = _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs)
    per_pair = (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2
    return batch_mean(per_pair, num_pairs), _metrics(beta * lc, beta * lr)


@op_range("nca_pair_loss")
@autocast_aware("keep")
def nca_pair_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
                  num_pairs: Optional[Number] = None) -> Result:
    """NCA (paired): -log sigmoid(beta r_c) - 0.5 log sigmoid(-beta r_c) - 0.5 log sigmoid(-beta r_r)."""
    lc, lr = _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs)
    c, r = beta * lc, beta * lr
    per_pair = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    return batch_mean(per_pair, num_pairs), _metrics(c, r)


@op_range("exo_pair_loss")
@autocast_aware("keep")
def exo_pair_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
                  label_smoothing: float = 1e-3, num_pairs: Optional[Number] = None) -> Result:
    """EXO (paired): the reverse KL between sigmoid(beta h) and the smoothed label (1 - e, e); e = 1e-3 if 0."""
    _coef("label_smoothing", label_smoothing, high=0.5, strict=False)
    e = label_smoothing or 1e-3
    lc, lr = _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs)
    z = beta * (lc - lr)
    per_pair = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - e))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e)))
    return batch_mean(per_pair, num_pairs), _metrics(beta * lc, beta * lr)


@op_range("aot_loss")
@autocast_aware("keep")
def aot_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
             paired: bool = True, label_smoothing: float = 0.0, num_pairs: Optional[Number] = None) -> Result:
    """AOT: DPO's (smoothed) form on sorted quantities over the batch.

    paired=True ("aot_pair"): delta = sort(r_c) - sort(r_r); False ("aot"):
    delta = sort(logp_c - logp_r) - sort(ref_c - ref_r).
    """
    _coef("label_smoothing", label_smoothing, high=0.5, strict=False)
    lc, lr = _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs)
    if paired:
        delta = torch.sort(lc).values - torch.sort(lr).values
    else:
        c, r, rc, rr = _inputs(chosen_logp=chosen_logp, rejected_logp=rejected_logp,
                               ref_chosen_logp=ref_chosen_logp, ref_rejected_logp=ref_rejected_logp)
        delta = torch.sort(c - r).values - torch.sort(rc - rr).values
    return batch_mean(_smoothed(beta * delta, label_smoothing), num_pairs), _metrics(beta * lc, beta * lr)


@op_range("discopop_loss")
@autocast_aware("keep")
def discopop_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
                  tau: float = 0.05, num_pairs: Optional[Number] = None) -> Result:
    """DiscoPOP (log-ratio modulated): (1 - m) softplus(-beta h) + m exp(-beta h), m = sigmoid(beta h / tau)."""
    _coef("tau", tau)
    lc, lr = _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs)
    z = beta * (lc - lr)
    m = torch.sigmoid(z / tau)
    per_pair = -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
    return batch_mean(per_pair, num_pairs), _metrics(beta * lc, beta * lr)


@op_range("wpo_weights")
def wpo_weights(chosen_logp, rejected_logp, chosen_len, rejected_len, *, chosen_adjust=None,
                rejected_adjust=None) -> torch.Tensor:
    """(P,) detached WPO weights min(exp(avg_c + avg_r), 1), avg = (logp - adjust) / len."""
    c, r, nc, nr = _inputs(chosen_logp=chosen_logp, rejected_logp=rejected_logp, chosen_len=chosen_len,
                           rejected_len=rejected_len)
    if (chosen_adjust is None) != (rejected_adjust is None):
        raise ValueError("chosen_adjust and rejected_adjust must be given together")
    if chosen_adjust is not None:
        ac, ar = _inputs(chosen_adjust=chosen_adjust, rejected_adjust=rejected_adjust)
        c, r = c - ac.to(c.dtype), r - ar.to(r.dtype)
    return torch.exp(c.detach() / nc + r.detach() / nr).clamp(max=1.0)


@op_range("wpo_loss")
@autocast_aware("keep")
def wpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, chosen_len, rejected_len, *,
             beta: float = 0.1, chosen_adjust=None, rejected_adjust=None,
             num_pairs: Optional[Number] = None) -> Result:
    """WPO: DPO's per-pair loss times `wpo_weights` (metric "weight_mean")."""
    lc, lr = _pairs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, num_pairs)
    w = wpo_weights(chosen_logp, rejected_logp, chosen_len, rejected_len, chosen_adjust=chosen_adjust,
                    rejected_adjust=rejected_adjust).to(lc.dtype)
    per_pair = -F.logsigmoid(beta * (lc - lr)) * w
    return batch_mean(per_pair, num_pairs), _metrics(beta * lc, beta * lr, weight_mean=w.mean())


@op_range("cpo_loss")
@autocast_aware("keep")
def cpo_loss(chosen_logp, rejected_logp, chosen_len, *, beta: float = 0.1, alpha: float = 1.0,
             label_smoothing: float = 0.0, nll: str = "token_mean", num_pairs: Optional[Number] = None,
             num_tokens: Optional[Number] = None) -> Result:
    """CPO: smoothed -log sigmoid(beta (logp_c - logp_r)) on sums (no reference) + alpha NLL(y_c).

    nll: "token_mean" (TRL's cross-entropy over the batch's chosen tokens; num_tokens= its
    global count) or "pair_mean". Extra metric "nll".
    """
    _coef("beta", beta)
    _coef("alpha", alpha, strict=False)
    _coef("label_smoothing", label_smoothing, high=0.5, strict=False)
    check_normaliser("num_pairs", num_pairs)
    c, r, n = _inputs(chosen_logp=chosen_logp, rejected_logp=rejected_logp, chosen_len=chosen_len)
    nll_value = nll_term(c, n, nll, num_pairs=num_pairs, num_tokens=num_tokens)
    loss = batch_mean(_smoothed(beta * (c - r), label_smoothing), num_pairs) + alpha * nll_value
    return loss, _metrics(beta * c, beta * r, nll=nll_term(c, n, nll))


@op_range("alphapo_loss")
@autocast_aware("keep")
def alphapo_loss(chosen_logp, rejected_logp, chosen_len, rejected_len, *, beta: float = 2.0, gamma: float = 0.5,
                 alpha: float = 0.25, label_smoothing: float = 0.0, num_pairs: Optional[Number] = None) -> Result:
    """AlphaPO: SimPO with the reward u = (1 - exp(-alpha avg)) / alpha, avg = logp / len (alpha 0: SimPO).

    z = beta (u_c - u_r) - gamma; loss -(1 - e) log sigmoid(z) - e log sigmoid(-z) (TRL CPOTrainer's
    alpha with loss_type "simpo").
    """
    _coef("beta", beta)
    _coef("gamma", gamma, strict=False)
    _coef("label_smoothing", label_smoothing, high=0.5, strict=False)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    check_normaliser("num_pairs", num_pairs)
    c, r, nc, nr = _inputs(chosen_logp=chosen_logp, rejected_logp=rejected_logp, chosen_len=chosen_len,
                           rejected_len=rejected_len)
    avg_c, avg_r = c / nc, r / nr
    if alpha != 0:
        avg_c, avg_r = -torch.expm1(-alpha * avg_c) / alpha, -torch.expm1(-alpha * avg_r) / alpha
    z = beta * (avg_c - avg_r) - gamma
    return batch_mean(_smoothed(z, label_smoothing), num_pairs), _metrics(beta * avg_c, beta * avg_r)


@op_range("sequence_logprobs")
def sequence_logprobs(hidden, weight, labels, cu_seqlens=None, *, bias=None, temperature: float = 1.0,
                      ignore_index: int = -100):
    """Per-sequence log-prob sums and token counts from hidden states, never building (N, V) logits.

    Args:
        hidden: (B, T, H) padded or (total, H) packed final hidden states; weight: (V, H) LM head.
        labels: (B, T) or (total,) token ids, `ignore_index` on prompt and padding positions.
        cu_seqlens: (B + 1,) int32 when packed.
    Returns:
        (sums (B,) float32, differentiable; lengths (B,) float32: the counted tokens).
    """
    from .logprobs import linear_logprobs

    check_tensor("labels", labels, dtypes=(torch.int32, torch.int64))
    logp = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index)
    layout = make_layout(logp, cu_seqlens, name="labels")
    keep = (labels != ignore_index).reshape(-1)
    flat = torch.where(keep, logp.reshape(-1), torch.zeros((), dtype=logp.dtype, device=logp.device))
    return segment_sum(flat, layout), segment_sum(keep.to(logp.dtype), layout)
