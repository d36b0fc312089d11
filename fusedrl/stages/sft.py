"""Supervised fine-tuning (instruction tuning) on packed chat examples.

    loss = -(sum of log p(label) over the step's trained tokens) / normaliser

where the normaliser is the step's trained-token count (`sft.normalize_by =
"tokens"`: the token mean over the whole step, however it is split into
micro-batches) or its sequence count (`"sequences"`: per-sequence sums averaged
over sequences). The LM head runs inside `linear_logprobs`, so the (tokens, vocab)
logits are never materialised.

Run it:

    fusedrl train examples/sft_qwen2_0.5b.toml                      # one GPU
    fusedrl train examples/sft_tiny.toml                             # the demo model on CPU
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch

from fusedrl.config import ConfigError
from fusedrl.data.batch import PackedBatch
from fusedrl.data.records import DataError, PackedDataset, load_records, tokenize_records
from fusedrl.models.causal_lm import token_logprobs
from fusedrl.stages.base import NORMALIZE_BY, BaseStage, StepTotals

logger = logging.getLogger("fusedrl")


class SFTStage(BaseStage):
    """Batches from a `PackedDataset`; the objective is the normalised negative log-likelihood.

    Args:
        dataset: the training micro-batches (its position is the stage's state).
        micro_batches_per_step: micro-batches accumulated per optimizer step.
        normalize_by: "tokens" or "sequences" (see the module docstring).
        eval_batches: packed held-out micro-batches for `evaluate`, or None.
    """

    name = "sft"

    def __init__(self, dataset: PackedDataset, *, micro_batches_per_step: int = 1, normalize_by: str = "tokens",
                 eval_batches: Optional[List[PackedBatch]] = None):
        if normalize_by not in NORMALIZE_BY:
            raise ValueError(f"normalize_by: expected one of {NORMALIZE_BY}, got {normalize_by!r}")
        if micro_batches_per_step < 1:
            raise ValueError(f"micro_batches_per_step: expected >= 1, got {micro_batches_per_step}")
        self.dataset = dataset
        self.micro_batches_per_step = micro_batches_per_step
        self.normalize_by = normalize_by
        self.eval_batches = eval_batches or []
        self._host: Dict[str, float] = {}

    def micro_batches(self, model, step: int) -> List[PackedBatch]:
        batches = self.dataset.next_batches(self.micro_batches_per_step)
        self._host = {"trained_tokens": float(sum(b.num_tokens for b in batches)),
                      "epoch": float(self.dataset.epoch)}
        return batches

    def loss(self, model, batch: PackedBatch, totals: StepTotals):
        logp = token_logprobs(model, batch)  # (total,)
        loss = -logp.sum() / totals.of(self.normalize_by)
        return loss, {}

    def host_metrics(self) -> Dict[str, float]:
        return dict(self._host)

    def evaluate(self, model) -> Dict[str, float]:
        """Token-mean negative log-likelihood on the held-out batches."""
        if not self.eval_batches:
            return {}
        device = next(model.parameters()).device
        total = torch.zeros((), device=device)
        tokens = 0
        for batch in self.eval_batches:
            total += -token_logprobs(model, batch.to(device)).sum()
            tokens += batch.num_tokens
        return {"loss": total.item() / max(tokens, 1)}

    def state_dict(self) -> dict:
        return {"data": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["data"])


def build_sft_stage(cfg, model, tokenizer) -> SFTStage:
    """The SFT stage of a TrainConfig: load, tokenize (logged drops) and pack data.train / data.eval."""
    data = cfg.data
    if not data.train:
        raise ConfigError.message("data.train", "data.train: the SFT stage needs a training file (set data.train)")
    examples, dropped = tokenize_records(load_records(data.train), tokenizer, max_len=data.max_len,
                                         train_on=data.train_on, overlong=data.overlong)
    if not examples:
        raise DataError(f"data.train: no example of {data.train!r} is left to train on ({dropped} dropped)")
    longest = max(len(e) for e in examples)
    if longest > data.token_budget:
        raise ConfigError.message("data.token_budget", f"data.token_budget: {data.token_budget} is smaller than the longest example "
                         f"({longest} tokens); raise it or lower data.max_len")
    logger.info("sft: %d training examples (%d dropped), token budget %d", len(examples), dropped,
                data.token_budget)
    dataset = PackedDataset(examples, data.token_budget, seed=cfg.run.seed, shuffle=data.shuffle)
    eval_batches = None
    if data.eval:
        eval_examples, _ = tokenize_records(load_records(data.eval), tokenizer, max_len=data.max_len,
                                            train_on=data.train_on, overlong=data.overlong)
        eval_set = PackedDataset(eval_examples, data.token_budget, seed=0, shuffle=False)
        count = len(eval_set) if cfg.sft.eval_micro_batches == 0 else min(cfg.sft.eval_micro_batches, len(eval_set))
        eval_batches = eval_set.next_batches(count)
    return SFTStage(dataset, micro_batches_per_step=data.micro_batches_per_step,
                    normalize_by=cfg.sft.normalize_by, eval_batches=eval_batches)
