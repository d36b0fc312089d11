"""Process-reward-model math (PRM800K-style): the per-step loss, step scores, solution scores, rewards.

A solution is a sequence of tokens; each reasoning step ends at one token (the last token of
the step, where the separator is rendered). Every function here takes per-token tensors in the
layouts of the RL objectives: padded (B, T) or packed (total,) + cu_seqlens (int32 (B + 1,)),
with step ends marked by `labels != ignore_index` (training) or a `step_mask` (scoring).

    head "classify"  logits (..., C), C = 2 or 3 classes; class C - 1 is the good step
                     loss = mean over step ends of -log softmax(logits)[label]
                     score s_k = softmax(logits)[C - 1] at step end k
    head "scalar"    logits (...); labels in {0, 1}
                     loss = mean over step ends of BCE-with-logits(logit, label); s_k = sigmoid(logit)
    step accuracy    mean over step ends of [argmax = label]   (scalar head: [logit > 0] = label)

    solution score   min_k s_k | prod_k s_k | s_K (the last step), over each solution's step ends
    token rewards    r_t = s_k - baseline at the token ending step k, 0 elsewhere (GAE / PPO)
    outcome reward   one solution score per sequence (GRPO family)

Raw PRM800K labels are {-1, 0, 1} (bad, neutral, good): `step_targets` maps them to class ids
(3 classes: -1 -> 0, 0 -> 1, 1 -> 2; 2 classes: -1 -> 0, 1 -> 1, 0 -> `neutral_as`).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._rl_layout import make_layout
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from ._ranges import op_range

HEADS = ("classify", "scalar")
SOLUTION_AGGREGATIONS = ("min", "prod", "last")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def step_targets(step_labels: torch.Tensor, num_classes: int = 3, *, neutral_as: int = 1,
                 ignore_index: int = -100) -> torch.Tensor:
    """Raw labels {-1, 0, 1} (ignore_index elsewhere) -> int64 class ids for a `num_classes` head.

    3 classes: -1 -> 0, 0 -> 1, 1 -> 2. 2 classes: -1 -> 0, 1 -> 1, 0 (neutral) -> `neutral_as` (0 or 1).
    Labels already in {0, 1} for a 2-class head are class ids: do not pass them through here.
    """
    check_tensor("step_labels", step_labels, dtypes=INDEX_DTYPES)
    if num_classes not in (2, 3):
        raise ValueError(f"num_classes must be 2 or 3, got {num_classes!r}")
    if neutral_as not in (0, 1):
        raise ValueError(f"neutral_as must be 0 or 1, got {neutral_as!r}")
    steps = step_labels != ignore_index
    bad = steps & ((step_labels < -1) | (step_labels > 1))
    if bool(bad.any()):
        raise ValueError(f"step_labels must be -1, 0, 1 or ignore_index={ignore_index}, got {int(step_labels[bad][0])}")
    raw = step_labels.long()
    if num_classes == 3:
        ids = raw + 1
    else:
        ids = torch.where(raw == 0, torch.full_like(raw, neutral_as), (raw > 0).long())
    return torch.where(steps, ids, torch.full_like(raw, ignore_index))


def _check_head_inputs(logits, labels, head: str, ignore_index: int) -> torch.Tensor:
    """Validate; returns the bool mask of step-end positions (labels != ignore_index)."""
    _check_choice("head", head, HEADS)
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, dtypes=INDEX_DTYPES)
    lead = tuple(logits.shape[:-1]) if head == "classify" else tuple(logits.shape)
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must have logits' token shape {lead} (head={head!r}), got {tuple(labels.shape)}")
    if head == "classify" and logits.shape[-1] not in (2, 3):
        raise ValueError(f"a classify head has 2 or 3 classes (logits' last dim), got {logits.shape[-1]}")
    steps = labels != ignore_index
    classes = logits.shape[-1] if head == "classify" else 2
    bad = steps & ((labels < 0) | (labels >= classes))
    if labels.device.type == "cpu" and bool(bad.any()):
        raise ValueError(f"labels must be class ids in [0, {classes}) or ignore_index={ignore_index}, "
                         f"got {int(labels[bad][0])}")
    return steps


@op_range("prm_loss")
def prm_loss(logits: torch.Tensor, labels: torch.Tensor, *, head: str = "classify",
             ignore_index: int = -100) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-step classification loss at step ends (mean over them; 0 when there are none).

    Args:
        logits: classify: (..., C) float, C in {2, 3}; scalar: (...) float (one logit per token).
        labels: (...) int class ids at step-end tokens (for the scalar head 0 / 1), ignore_index elsewhere.
        head: "classify" (cross-entropy) or "scalar" (binary cross-entropy with logits).
    Returns:
        loss (0-d, float32 or float64) and metrics {"step_accuracy", "steps"} (detached 0-d float32).
    """
    steps = _check_head_inputs(logits, labels, head, ignore_index)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    count = steps.sum()
    if head == "classify":
        flat = logits.reshape(-1, logits.shape[-1]).to(dtype)
        target = torch.where(steps, labels, 0).reshape(-1).long()
        per = -torch.log_softmax(flat, -1).gather(1, target[:, None])[:, 0]
        correct = flat.argmax(-1) == target
    else:
        flat = logits.reshape(-1).to(dtype)
        target = torch.where(steps, labels, 0).reshape(-1).to(dtype)
        per = torch.nn.functional.binary_cross_entropy_with_logits(flat, target, reduction="none")
        correct = (flat > 0).to(dtype) == target
    m = steps.reshape(-1)
    loss = torch.where(m, per, 0.0).sum() / count.clamp(min=1)
    with torch.no_grad():
        acc = (correct & m).sum().float() / count.clamp(min=1).float()
    return loss, {"step_accuracy": acc, "steps": count.float()}


def step_scores(logits: torch.Tensor, *, head: str = "classify") -> torch.Tensor:
    """Probability that each token's step is good: softmax(...)[C - 1] (classify) or sigmoid (scalar); (...)."""
    _check_choice("head", head, HEADS)
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if head == "classify":
        return torch.softmax(logits.float() if logits.dtype != torch.float64 else logits, -1)[..., -1]
    return torch.sigmoid(logits.float() if logits.dtype != torch.float64 else logits)


def _flat(scores, step_mask, cu_seqlens):
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES)
    check_tensor("step_mask", step_mask)
    if tuple(step_mask.shape) != tuple(scores.shape):
        raise ValueError(f"step_mask must have scores' shape {tuple(scores.shape)}, got {tuple(step_mask.shape)}")
    layout = make_layout(scores, cu_seqlens, name="scores")
    return scores.reshape(-1), step_mask.reshape(-1) != 0, layout


def aggregate_step_scores(scores: torch.Tensor, step_mask: torch.Tensor, *, how: str = "min",
                          cu_seqlens: Optional[torch.Tensor] = None, empty: float = 1.0) -> torch.Tensor:
    """One score per solution from its step-end scores: "min", "prod" or "last"; (B,).

    Args:
        scores: (B, T) padded or (total,) packed per-token scores (e.g. `step_scores`).
        step_mask: scores' shape, nonzero at step-end tokens.
        cu_seqlens: (B + 1,) int32 for the packed layout.
        empty: the score of a solution with no step end (default 1.0, the empty min/product).
    Also the outcome reward of a solution for the GRPO family.
    """
    _check_choice("how", how, SOLUTION_AGGREGATIONS)
    s, m, layout = _flat(scores, step_mask, cu_seqlens)
    b = layout.num_seqs
    ids = layout.seq_ids
    has = torch.zeros(b, dtype=torch.long, device=s.device).index_add(0, ids, m.long()) > 0
    if how == "min":
        vals = torch.where(m, s, torch.full_like(s, float("inf")))
        out = torch.full((b,), float("inf"), dtype=s.dtype, device=s.device).scatter_reduce(0, ids, vals, "amin")
    elif how == "prod":
        out = torch.ones(b, dtype=s.dtype, device=s.device).scatter_reduce(0, ids, torch.where(m, s, 1.0), "prod")
    else:
        pos = torch.arange(s.numel(), device=s.device)
        last = torch.full((b,), -1, dtype=torch.long, device=s.device).scatter_reduce(
            0, ids, torch.where(m, pos, -1), "amax")
        out = s[last.clamp(min=0)] if s.numel() else torch.zeros(b, dtype=s.dtype, device=s.device)
    return torch.where(has, out, torch.full_like(out, empty))


def solution_accuracy(scores: torch.Tensor, labels: torch.Tensor, *, how: str = "min", good_label: int = 1,
                      threshold: float = 0.5, cu_seqlens: Optional[torch.Tensor] = None,
                      ignore_index: int = -100) -> torch.Tensor:
    """Fraction of solutions (with at least one step) whose aggregated score > threshold exactly when
    every step is good (label == good_label: 1 for 2 classes / the scalar head, 2 for 3 classes); 0-d."""
    check_tensor("labels", labels, dtypes=INDEX_DTYPES)
    steps = labels != ignore_index
    predicted = aggregate_step_scores(scores, steps, how=how, cu_seqlens=cu_seqlens) > threshold
    bad_step = (steps & (labels != good_label)).to(scores.dtype)
    _, _, layout = _flat(scores, steps, cu_seqlens)
    n_bad = torch.zeros(layout.num_seqs, dtype=scores.dtype, device=scores.device).index_add(
        0, layout.seq_ids, bad_step.reshape(-1))
    n_steps = torch.zeros(layout.num_seqs, dtype=torch.long, device=scores.device).index_add(
        0, layout.seq_ids, steps.reshape(-1).long())
    scored = n_steps > 0
    right = (predicted == (n_bad == 0)) & scored
    return right.sum().float() / scored.sum().clamp(min=1).float()


def token_rewards(scores: torch.Tensor, step_mask: torch.Tensor, *, baseline: float = 0.0) -> torch.Tensor:
    """Dense per-token rewards for GAE / PPO: scores - baseline at step-end tokens, 0 elsewhere (scores' shape)."""
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES)
    check_tensor("step_mask", step_mask)
    if tuple(step_mask.shape) != tuple(scores.shape):
        raise ValueError(f"step_mask must have scores' shape {tuple(scores.shape)}, got {tuple(step_mask.shape)}")
    return torch.where(step_mask != 0, scores - baseline, torch.zeros_like(scores))
