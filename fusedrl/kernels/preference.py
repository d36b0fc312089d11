"""Direct-alignment (preference) losses from per-sequence summed log-probs (docs/objectives.md).

Inputs are (P,) float per-sequence sums over completion tokens: `chosen_logp`,
`rejected_logp` under the policy (differentiable), `ref_chosen_logp`,
`ref_rejected_logp` under the frozen reference (cached once per pass; treated
as constants). Length-normalised losses take (P,) completion lengths too.
With h = (logp_c - ref_c) - (logp_r - ref_r):

    DPO       -log sigmoid(beta h)                                      beta = 0.1
    cDPO      -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)     e = 0.1
    IPO       (h - 1 / (2 beta))^2        (h of per-token averages with chosen_len / rejected_len: TRL)
    SimPO     -log sigmoid(beta (avg_c - avg_r) - gamma), avg = logp / len, no reference (beta 2, gamma 0.5),
              optional label smoothing
    ORPO      NLL(y_c) - lam log sigmoid(lo_c - lo_r), lo = a - log(1 - exp(a)), a = avg  (lam 0.1);
              NLL per pair or per token, over the completion or prompt + completion
    KTO       desirable 1 - sigmoid(beta (r - z0)), undesirable 1 - sigmoid(beta (z0 - r)),
              r = logp - ref, z0 = sg(clamp(mean KL of mismatched pairs, min 0))
    APO-zero  1 - sigmoid(beta r_c) + sigmoid(beta r_r)             (TRL's values)
    APO-down  sigmoid(beta r_c) + 1 - sigmoid(beta (r_c - r_r))
    RPO       DPO + alpha * NLL(y_c), per pair (-logp_c / len_c) or the batch token mean   (alpha 1)
    more      hinge, robust, BCO, SPPO, NCA, EXO, AOT, DiscoPOP, WPO, dpo_norm, CPO, AlphaPO:
              preference_pairs.py

Every loss is the mean over the P pairs (or `num_pairs`, a global count for
gradient accumulation) and returns (loss, metrics) with detached 0-d tensors:
"accuracy" (share of pairs with chosen reward > rejected reward), "margin"
(mean chosen - rejected reward), "chosen_reward", "rejected_reward" (means);
implicit rewards are beta * (logp - ref) for the reference-based losses and
the length-normalised log-probs (times beta for SimPO) otherwise.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ._autocast import autocast_aware
from ._rl_layout import Number, batch_mean, check_normaliser
from ._validate import FLOAT_DTYPES, check_tensor
from ._ranges import op_range

Metrics = Dict[str, torch.Tensor]
Result = Tuple[torch.Tensor, Metrics]


def _inputs(**tensors) -> Tuple[torch.Tensor, ...]:
    """Validate (P,) sequence tensors of one shape; cast to the compute dtype (refs detached)."""
    first_name, first = next(iter(tensors.items()))
    check_tensor(first_name, first, dtypes=FLOAT_DTYPES + (torch.int32, torch.int64), ndim=1)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32
    out = []
    for name, t in tensors.items():
        check_tensor(name, t, dtypes=FLOAT_DTYPES + (torch.int32, torch.int64))
        if t.shape != first.shape:
            raise ValueError(f"{name} must have {first_name}'s shape {tuple(first.shape)}, got {tuple(t.shape)}")
        t = t.to(dtype)
        out.append(t.detach() if name.startswith("ref_") or name.endswith("_len") else t)
    return tuple(out)


def _coef(name: str, value, *, low: float = 0.0, high: Optional[float] = None, strict: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    bad = value <= low if strict else value < low
    if bad or (high is not None and value > high):
        rng = f"({low}, {high if high is not None else 'inf'})"
        raise ValueError(f"{name} must be in {rng}, got {value}")


def _metrics(chosen: torch.Tensor, rejected: torch.Tensor, **extra) -> Metrics:
    with torch.no_grad():
        out = {
            "accuracy": (chosen > rejected).to(chosen.dtype).mean(),
            "margin": (chosen - rejected).mean(),
            "chosen_reward": chosen.mean(),
            "rejected_reward": rejected.mean(),
        }
        out.update({k: v.detach() for k, v in extra.items()})
    return out


def _logratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp):
    c, r, rc, rr = _inputs(chosen_logp=chosen_logp, rejected_logp=rejected_logp,
                           ref_chosen_logp=ref_chosen_logp, ref_rejected_logp=ref_rejected_logp)
    return c - rc, r - rr


@op_range("dpo_loss")
@autocast_aware("keep")
def dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
             num_pairs: Optional[Number] = None) -> Result:
    """DPO: -log sigmoid(beta h). All inputs (P,) float sequence sums. Returns (loss, metrics)."""
    _coef("beta", beta)
    check_normaliser("num_pairs", num_pairs)
    lc, lr = _logratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    loss = batch_mean(-F.logsigmoid(beta * (lc - lr)), num_pairs)
    return loss, _metrics(beta * lc, beta * lr)


@op_range("cdpo_loss")
@autocast_aware("keep")
def cdpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
              label_noise: float = 0.1, num_pairs: Optional[Number] = None) -> Result:
    """Conservative DPO: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h), e = label_noise in [0, 0.5]."""
    _coef("beta", beta)
    _coef("label_noise", label_noise, high=0.5, strict=False)
    check_normaliser("num_pairs", num_pairs)
    lc, lr = _logratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    z = beta * (lc - lr)
    per_pair = -(1 - label_noise) * F.logsigmoid(z) - label_noise * F.logsigmoid(-z)
    return batch_mean(per_pair, num_pairs), _metrics(beta * lc, beta * lr)


@op_range("ipo_loss")
@autocast_aware("keep")
def ipo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
             chosen_len=None, rejected_len=None, num_pairs: Optional[Number] = None) -> Result:
    """IPO: (h - 1 / (2 beta))^2. Returns (loss, metrics).

    chosen_len, rejected_len: None (h on sequence sums, the paper) or (P,) completion lengths:
    every log-prob (policy and reference) is divided by its length first (TRL's IPO).
    """
    _coef("beta", beta)
    check_normaliser("num_pairs", num_pairs)
    lc, lr = _logratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    lc, lr = _per_token(lc, lr, chosen_len, rejected_len)
    per_pair = (lc - lr - 1.0 / (2.0 * beta)) ** 2
    return batch_mean(per_pair, num_pairs), _metrics(beta * lc, beta * lr)


def _per_token(lc, lr, chosen_len, rejected_len):
    """(lc / len_c, lr / len_r), or unchanged when no lengths are given."""
    if chosen_len is None and rejected_len is None:
        return lc, lr
    if chosen_len is None or rejected_len is None:
        raise ValueError("chosen_len and rejected_len must be given together")
    nc, nr = _inputs(chosen_len=chosen_len, rejected_len=rejected_len)
    if nc.shape != lc.shape:
        raise ValueError(f"chosen_len must have chosen_logp's shape {tuple(lc.shape)}, got {tuple(nc.shape)}")
    return lc / nc.to(lc.dtype), lr / nr.to(lr.dtype)


@op_range("simpo_loss")
@autocast_aware("keep")
def simpo_loss(chosen_logp, rejected_logp, chosen_len, rejected_len, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0, num_pairs: Optional[Number] = None) -> Result:
    """SimPO: -(1 - e) log sigmoid(z) - e log sigmoid(-z), z = beta (logp_c / len_c - logp_r / len_r) - gamma.

    No reference. chosen_len, rejected_len: (P,) completion lengths (int or float, > 0);
    label_smoothing e in [0, 0.5] (TRL CPOTrainer's simpo; 0 is the paper's loss).
    """
    _coef("beta", beta)
    _coef("gamma", gamma, strict=False)
    _coef("label_smoothing", label_smoothing, high=0.5, strict=False)
    check_normaliser("num_pairs", num_pairs)
    c, r, lc, lr = _inputs(chosen_logp=chosen_logp, rejected_logp=rejected_logp,
                           chosen_len=chosen_len, rejected_len=rejected_len)
    avg_c, avg_r = c / lc, r / lr
    z = beta * (avg_c - avg_r) - gamma
    loss = batch_mean(-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z), num_pairs)
    return loss, _metrics(beta * avg_c, beta * avg_r)


@op_range("orpo_loss")
@autocast_aware("keep")
def orpo_loss(chosen_logp, rejected_logp, chosen_len, rejected_len, *, lam: float = 0.1, nll: str = "pair_mean",
              nll_logp=None, nll_len=None, num_pairs: Optional[Number] = None,
              num_tokens: Optional[Number] = None) -> Result:
    """ORPO: NLL(y_c) - lam log sigmoid(logodds_c - logodds_r); no reference.

    a = logp / len (< 0), logodds = a - log(1 - exp(a)) (computed as a - log(-expm1(a))).
    nll: "pair_mean" (mean over pairs of -logp_c / len_c, the paper) or "token_mean" (sum of
        -logp_c over the batch / its chosen tokens, TRL's cross-entropy; num_tokens= the
        global count under gradient accumulation).
    nll_logp, nll_len: None (the NLL covers the chosen completion) or (P,) the chosen
        sequence's log-prob sums and token counts over prompt + completion (TRL's ORPO NLL).
    Extra metrics: "nll", "log_odds_ratio" (mean lo_c - lo_r).
    """
    _coef("lam", lam, strict=False)
    check_normaliser("num_pairs", num_pairs)
    c, r, lc, lr = _inputs(chosen_logp=chosen_logp, rejected_logp=rejected_logp,
                           chosen_len=chosen_len, rejected_len=rejected_len)
    avg_c, avg_r = c / lc, r / lr
    log_odds = (avg_c - torch.log(-torch.expm1(avg_c))) - (avg_r - torch.log(-torch.expm1(avg_r)))
    nll_value = nll_term(c, lc, nll, nll_logp, nll_len, num_pairs, num_tokens)
    loss = nll_value + batch_mean(-lam * F.logsigmoid(log_odds), num_pairs)
    local_nll = nll_term(c, lc, nll, nll_logp, nll_len)  # the metric: this batch's mean, like the others
    return loss, _metrics(avg_c, avg_r, nll=local_nll, log_odds_ratio=log_odds.mean())


NLL_MODES = ("pair_mean", "token_mean")


def nll_term(chosen_logp, chosen_len, mode: str, nll_logp=None, nll_len=None, num_pairs=None,
             num_tokens=None) -> torch.Tensor:
    """The chosen NLL of RPO / CPO / ORPO: "pair_mean" mean_p(-logp_p / len_p) (over num_pairs),
    "token_mean" sum_p(-logp_p) / sum_p(len_p) (over num_tokens); over nll_logp / nll_len when given."""
    if mode not in NLL_MODES:
        raise ValueError(f"nll must be one of {NLL_MODES}, got {mode!r}")
    check_normaliser("num_tokens", num_tokens)
    if (nll_logp is None) != (nll_len is None):
        raise ValueError("nll_logp and nll_len must be given together")
    if nll_logp is not None:
        chosen_logp, chosen_len = _inputs(nll_logp=nll_logp, nll_len=nll_len)
        if chosen_logp.shape[0] != chosen_len.shape[0]:
            raise ValueError("nll_logp and nll_len must have one entry per pair")
    if mode == "pair_mean":
        return batch_mean(-chosen_logp / chosen_len, num_pairs)
    denom = chosen_len.sum().clamp(min=1) if num_tokens is None else num_tokens
    return -chosen_logp.sum() / denom


@op_range("kto_loss")
@autocast_aware("keep")
def kto_loss(policy_logp, ref_logp, desirable, *, kl_policy_logp=None, kl_ref_logp=None, kl_baseline=None,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             kl_grad: bool = False, num_pairs: Optional[Number] = None) -> Result:
    """KTO on unpaired examples.

    Args:
        policy_logp, ref_logp: (N,) float sequence sums of each example's completion.
        desirable: (N,) bool (or 0/1) -- True for a desirable completion.
        kl_policy_logp, kl_ref_logp: (M,) sums on mismatched (prompt, completion) pairs;
            z0 = sg(clamp(mean(kl_policy_logp - kl_ref_logp), min=0)). Or pass z0
            directly as kl_baseline (float or 0-d tensor). Neither given: z0 = 0.
        kl_grad: False (TRL, OpenRLHF's KTOLoss: z0 detached) or True (z0 keeps its gradient
            through kl_policy_logp, as OpenRLHF's VanillaKTOLoss).
        beta; desirable_weight / undesirable_weight: lambda_D / lambda_U (1.0 each).
        num_pairs: global example count (default N).
    Returns: loss (0-d), metrics {"accuracy" (share with r on the right side of z0),
        "chosen_reward" / "rejected_reward" (mean beta r over desirable / undesirable),
        "margin" (their difference), "kl" (z0)}.
    """
    _coef("beta", beta)
    _coef("desirable_weight", desirable_weight, strict=False)
    _coef("undesirable_weight", undesirable_weight, strict=False)
    check_normaliser("num_pairs", num_pairs)
    logp, ref = _inputs(policy_logp=policy_logp, ref_logp=ref_logp)
    check_tensor("desirable", desirable)
    if desirable.shape != logp.shape:
        raise ValueError(f"desirable must have policy_logp's shape {tuple(logp.shape)}, got {tuple(desirable.shape)}")
    good = desirable != 0
    z0 = _kto_baseline(kl_policy_logp, kl_ref_logp, kl_baseline, logp, kl_grad)
    r = logp - ref
    per_ex = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    with torch.no_grad():
        n_good = good.sum().clamp(min=1)
        n_bad = (~good).sum().clamp(min=1)
        chosen = torch.where(good, beta * r, 0.0).sum() / n_good
        rejected = torch.where(good, 0.0, beta * r).sum() / n_bad
        right = torch.where(good, r > z0, r < z0).to(r.dtype).mean()
        metrics = {"accuracy": right, "chosen_reward": chosen, "rejected_reward": rejected,
                   "margin": chosen - rejected, "kl": z0.detach() + torch.zeros((), dtype=r.dtype, device=r.device)}
    return batch_mean(per_ex, num_pairs), metrics


def _kto_baseline(kl_policy_logp, kl_ref_logp, kl_baseline, like: torch.Tensor, grad: bool = False) -> torch.Tensor:
    if kl_baseline is not None:
        if kl_policy_logp is not None or kl_ref_logp is not None:
            raise ValueError("pass either kl_baseline or kl_policy_logp/kl_ref_logp, not both")
        if isinstance(kl_baseline, torch.Tensor):
            return kl_baseline.detach().to(like.dtype).clamp(min=0)
        _coef("kl_baseline", kl_baseline, strict=False, low=float("-inf"))
        return torch.tensor(max(float(kl_baseline), 0.0), dtype=like.dtype, device=like.device)
    if (kl_policy_logp is None) != (kl_ref_logp is None):
        raise ValueError("kl_policy_logp and kl_ref_logp must be given together")
    if kl_policy_logp is None:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    kp, kr = _inputs(kl_policy_logp=kl_policy_logp, kl_ref_logp=kl_ref_logp)
    z0 = (kp - kr.detach()).mean().clamp(min=0)
    return z0 if grad else z0.detach()


@op_range("apo_zero_loss")
@autocast_aware("keep")
def apo_zero_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
                  num_pairs: Optional[Number] = None) -> Result:
    """APO-zero: (1 - sigmoid(beta r_c)) + sigmoid(beta r_r), r = logp - ref (sequence sums; TRL's value)."""
    _coef("beta", beta)
    check_normaliser("num_pairs", num_pairs)
    lc, lr = _logratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    per_pair = (1 - torch.sigmoid(beta * lc)) + torch.sigmoid(beta * lr)
    return batch_mean(per_pair, num_pairs), _metrics(beta * lc, beta * lr)


@op_range("apo_down_loss")
@autocast_aware("keep")
def apo_down_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta: float = 0.1,
                  num_pairs: Optional[Number] = None) -> Result:
    """APO-down: sigmoid(beta r_c) + (1 - sigmoid(beta (r_c - r_r))), r = logp - ref (sequence sums; TRL's value)."""
    _coef("beta", beta)
    check_normaliser("num_pairs", num_pairs)
    lc, lr = _logratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    per_pair = torch.sigmoid(beta * lc) + (1 - torch.sigmoid(beta * (lc - lr)))
    return batch_mean(per_pair, num_pairs), _metrics(beta * lc, beta * lr)


@op_range("rpo_loss")
@autocast_aware("keep")
def rpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, chosen_len, *, beta: float = 0.1,
             alpha: float = 1.0, nll: str = "pair_mean", num_pairs: Optional[Number] = None,
             num_tokens: Optional[Number] = None) -> Result:
    """DPO + NLL (RPO): -log sigmoid(beta h) + alpha * NLL(y_c). Extra metric "nll".

    nll: "pair_mean" (mean over pairs of -logp_c / len_c) or "token_mean" (the batch's
    chosen tokens: sum -logp_c / sum len_c, TRL's rpo_alpha; num_tokens= its global count).
    """
    _coef("beta", beta)
    _coef("alpha", alpha, strict=False)
    check_normaliser("num_pairs", num_pairs)
    lc, lr = _logratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    c, length = _inputs(chosen_logp=chosen_logp, chosen_len=chosen_len)
    nll_value = nll_term(c, length, nll, num_pairs=num_pairs, num_tokens=num_tokens)
    loss = batch_mean(-F.logsigmoid(beta * (lc - lr)), num_pairs) + alpha * nll_value
    return loss, _metrics(beta * lc, beta * lr, nll=nll_term(c, length, nll))
