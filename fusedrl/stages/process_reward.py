"""Process reward models: the `reward_model` stage with `kind = "process"`.

A `ProcessRewardModel` (base model + a step head) reads each step's last token
(`fusedrl.data.prm`); only those positions carry loss (`fusedrl.kernels.prm_loss`):

    head "classify"  cross-entropy over 2 or 3 classes (bad / [neutral] / good)
    head "scalar"    binary cross-entropy of one logit (good = 1)

The loss of a micro-batch is its mean over step ends times (its steps / the step's steps),
so accumulation gives the mean over every step of the optimizer step. Evaluation on data.eval:
per-step accuracy, the majority-class rate it should beat, and per-solution accuracy under the
min / prod / last aggregations of the step scores (a solution is right when its aggregated
score > 0.5 exactly when every step is good).

    [run]
    stage = "reward_model"
    [reward_model]
    kind = "process"
    prm_head = "classify"     # or "scalar"
    prm_classes = 3           # 2 or 3
    step_separator = "\\n"
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch

from fusedrl.data.batch import IGNORE_INDEX, PackedBatch
from fusedrl.data.packed import PackedDataset
from fusedrl.data.prm import is_signed, prm_examples
from fusedrl.kernels.prm import SOLUTION_AGGREGATIONS, prm_loss, solution_accuracy, step_scores
from fusedrl.models.process_head import ProcessRewardModel
from fusedrl.stages.base import BaseStage, StepTotals

logger = logging.getLogger("fusedrl")


class ProcessRewardStage(BaseStage):
    """Per-step training of a ProcessRewardModel on a PackedDataset of `fusedrl.data.prm` examples.

    Args:
        dataset: the training examples, packed.
        head: "classify" or "scalar" (must match the model).
        micro_batches_per_step: micro-batches accumulated per optimizer step.
        eval_batches: held-out batches, or None.
    """

    name = "reward_model"

    def __init__(self, dataset: PackedDataset, *, head: str = "classify", micro_batches_per_step: int = 1,
                 eval_batches: Optional[List[PackedBatch]] = None):
        if head not in ("classify", "scalar"):
            raise ValueError(f"head: expected 'classify' or 'scalar', got {head!r}")
        if isinstance(micro_batches_per_step, bool) or not isinstance(micro_batches_per_step, int) \
                or micro_batches_per_step < 1:
            raise ValueError(f"micro_batches_per_step: expected an int >= 1, got {micro_batches_per_step!r}")
        self.dataset, self.head = dataset, head
        self.micro_batches_per_step = micro_batches_per_step
        self.eval_batches = eval_batches or []

    def micro_batches(self, model, step: int) -> List[PackedBatch]:
        return self.dataset.next_batches(self.micro_batches_per_step)

    def loss(self, model, batch: PackedBatch, totals: StepTotals):
        if not hasattr(model, "token_logits"):
            raise TypeError(f"model: a process reward model trains a ProcessRewardModel, got {type(model).__name__}")
        loss, metrics = prm_loss(model.token_logits(batch), batch.labels, head=self.head)
        share = batch.num_tokens / totals.tokens  # this batch's steps over the step's steps
        return loss * share, {"step_accuracy": metrics["step_accuracy"] * share}

    def evaluate(self, model) -> Dict[str, float]:
        if not self.eval_batches:
            return {}
        return prm_metrics(model, self.eval_batches, head=self.head)

    def state_dict(self) -> dict:
        return {"data": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["data"])


@torch.no_grad()
def prm_metrics(model, batches: List[PackedBatch], *, head: str) -> Dict[str, float]:
    """Step accuracy, majority-class rate and solution accuracy (min / prod / last) over held-out batches."""
    device = next(model.parameters()).device
    steps = correct = solutions = 0.0
    solved = {how: 0.0 for how in SOLUTION_AGGREGATIONS}
    counts: Dict[int, int] = {}
    for batch in batches:
        batch = batch.to(device)
        logits = model.token_logits(batch)
        _, metrics = prm_loss(logits, batch.labels, head=head)
        n = float(batch.num_tokens)
        steps += n
        correct += metrics["step_accuracy"].item() * n
        good = (logits.shape[-1] - 1) if head == "classify" else 1
        scores = step_scores(logits, head=head)
        scored = float(batch.num_seqs)  # every PRM example has at least one step
        for how in SOLUTION_AGGREGATIONS:
            acc = solution_accuracy(scores, batch.labels, how=how, good_label=good, cu_seqlens=batch.cu_seqlens)
            solved[how] += acc.item() * scored
        solutions += scored
        for value, count in zip(*torch.unique(batch.labels[batch.labels != IGNORE_INDEX], return_counts=True)):
            counts[int(value)] = counts.get(int(value), 0) + int(count)
    out = {"step_accuracy": correct / max(steps, 1), "majority_rate": max(counts.values(), default=0) / max(steps, 1),
           "steps": steps}
    out.update({f"solution_accuracy_{how}": solved[how] / max(solutions, 1) for how in SOLUTION_AGGREGATIONS})
    return out


def build_process_reward_model(cfg, tokenizer, device) -> ProcessRewardModel:
    """A fresh step head on the base of model.name_or_path (a causal LM) or of a model built from model.arch."""
    from fusedrl.models.causal_lm import build_policy

    rm = cfg.reward_model
    return ProcessRewardModel.from_causal_lm(build_policy(cfg.model, tokenizer, device), head=rm.prm_head,
                                             num_classes=rm.prm_classes)


def build_process_reward_stage(cfg, model, tokenizer) -> ProcessRewardStage:
    """The stage of a config whose [reward_model] has kind = "process"."""
    from fusedrl.data.records import load_records

    rm, data = cfg.reward_model, cfg.data
    if not isinstance(model, ProcessRewardModel):
        raise TypeError(f"model: kind 'process' trains a ProcessRewardModel, got {type(model).__name__}; build it "
                        f"with fusedrl.stages.process_reward.build_process_reward_model(cfg, tokenizer, device)")
    if not isinstance(rm.step_separator, str) or not rm.step_separator:
        raise ValueError(f"reward_model.step_separator: expected a non-empty string, got {rm.step_separator!r}")
    if not data.train:
        raise ValueError("data.train: the process reward model needs a file of prompt/steps/labels records")
    records = load_records(data.train)
    signed = is_signed(records) if records else True
    common = dict(separator=rm.step_separator, max_len=data.max_len,
                  num_classes=rm.prm_classes if rm.prm_head == "classify" else 2, neutral_as=rm.neutral_as,
                  signed=signed)
    examples, dropped = prm_examples(records, tokenizer, **common)
    if not examples:
        raise ValueError(f"data.train: no record has a step within data.max_len={data.max_len} ({dropped} dropped)")
    dataset = PackedDataset(examples, data.token_budget, seed=cfg.run.seed, shuffle=data.shuffle)
    eval_batches = None
    if data.eval:
        held_out, _ = prm_examples(load_records(data.eval), tokenizer, **common)
        eval_set = PackedDataset(held_out, data.token_budget, seed=0, shuffle=False)
        eval_batches = eval_set.next_batches(rm.eval_micro_batches or len(eval_set))
    logger.info("reward_model (process, %s head): %d solutions, %d dropped", rm.prm_head, len(examples), dropped)
    return ProcessRewardStage(dataset, head=rm.prm_head, micro_batches_per_step=data.micro_batches_per_step,
                              eval_batches=eval_batches)
