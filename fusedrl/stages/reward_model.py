"""Reward modeling: a scalar-head model trained on preferences, rankings or outcome labels.

    loss = "bradley_terry"  -log sigmoid(r_c - r_r)            over every pair (i < j) of each group
    loss = "margin"         -log sigmoid(r_c - r_r - m)        m from the record (Llama 2), pairs only
    loss = "plackett_luce"  -sum_k [r_s(k) - logsumexp_{j>=k} r_s(j)]   K completions ranked best first
    loss = "outcome"        per-token BCE of the head's logit against the record's 0/1 label

r is the scalar head read at each sequence's last token (`ScalarHeadModel.scores`).
All completions of one prompt are packed into one micro-batch (`GroupedDataset`),
so every pair of a prompt meets in one loss. Losses come from `fusedrl.kernels`.

Data: ``prompt``/``chosen``/``rejected`` records (K = 2), ``prompt``/``completions``
records (K completions best first) or, for "outcome", ``prompt``/``completion``/``label``.
Evaluation on data.eval: pairwise accuracy and mean margin (outcome: label accuracy).

    fusedrl train CONFIG.toml     # [run] stage = "reward_model"; a Qwen2-0.5B example: docs/alignment_stages.md
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch

from fusedrl.config import ConfigError
from fusedrl.data.batch import PackedBatch
from fusedrl.data.records import PackedDataset, load_records, tokenize_sft
from fusedrl.models.scalar_head import ScalarHeadModel
from fusedrl.stages.configs_alignment import RM_LOSSES, RewardModelConfig, check_section
from fusedrl.stages.base import BaseStage, StepTotals
from fusedrl.stages.groups import GroupedDataset, completion_token_mask, tokenize_groups
from fusedrl.kernels import bradley_terry_loss, outcome_rm_loss, plackett_luce_loss
from fusedrl.data.validate import DataError

logger = logging.getLogger("fusedrl")


def pair_scores(scores: torch.Tensor, ranking: torch.Tensor):
    """(chosen, rejected) scores of every pair (i < j) of each ranked group.

    Args:
        scores: (num_seqs,) float per-sequence scores.
        ranking: (G, K) int64 sequence indices, best first.
    Returns:
        Two (G * K (K - 1) / 2,) tensors.
    """
    k = ranking.shape[1]
    better, worse = torch.triu_indices(k, k, offset=1, device=ranking.device)
    return scores[ranking[:, better]].reshape(-1), scores[ranking[:, worse]].reshape(-1)


class RewardModelStage(BaseStage):
    """Pairwise / K-wise / outcome reward-model training on a `ScalarHeadModel`.

    Args:
        dataset: a `GroupedDataset` (pairwise, K-wise) or, for "outcome", a `PackedDataset`
            whose examples carry ``extras["label"]``.
        loss: one of RM_LOSSES.
        micro_batches_per_step: micro-batches accumulated per optimizer step.
        eval_batches: held-out micro-batches of the same kind, or None.
    """

    name = "reward_model"

    def __init__(self, dataset, *, loss: str = "bradley_terry", micro_batches_per_step: int = 1,
                 eval_batches: Optional[List[PackedBatch]] = None):
        if loss not in RM_LOSSES:
            raise ValueError(f"loss: expected one of {RM_LOSSES}, got {loss!r}")
        grouped = isinstance(dataset, GroupedDataset)
        if grouped == (loss == "outcome"):
            want = "a PackedDataset with 'label' extras" if loss == "outcome" else "a GroupedDataset"
            raise TypeError(f"dataset: loss {loss!r} needs {want}, got {type(dataset).__name__}")
        if grouped and loss == "margin" and dataset.group_size != 2:
            raise ValueError(f"loss: 'margin' needs chosen/rejected pairs, got groups of {dataset.group_size}")
        if isinstance(micro_batches_per_step, bool) or not isinstance(micro_batches_per_step, int) \
                or micro_batches_per_step < 1:
            raise ValueError(f"micro_batches_per_step: expected an int >= 1, got {micro_batches_per_step!r}")
        self.dataset, self.loss_name = dataset, loss
        self.micro_batches_per_step = micro_batches_per_step
        self.eval_batches = eval_batches or []

    def micro_batches(self, model, step: int) -> List[PackedBatch]:
        return self.dataset.next_batches(self.micro_batches_per_step)

    def loss(self, model, batch: PackedBatch, totals: StepTotals):
        """(loss, metrics): a sum over this micro-batch's groups (or tokens) divided by the step's count."""
        if not hasattr(model, "scores"):  # duck-typed: compiled or sharded wrappers keep the methods
            raise TypeError(f"model: the reward-model stage trains a ScalarHeadModel, got {type(model).__name__}")
        if self.loss_name == "outcome":
            logits = model.token_values(batch)  # (total,) float32
            mask = completion_token_mask(batch.labels)
            loss, metrics = outcome_rm_loss(logits, batch.extras["label"], mask, cu_seqlens=batch.cu_seqlens,
                                            num_tokens=totals.tokens)
            share = batch.num_tokens / totals.tokens
        else:
            scores = model.scores(batch)  # (num_seqs,) float32
            ranking = batch.extras["ranking"]  # (G, K)
            k = ranking.shape[1]
            if self.loss_name == "plackett_luce":
                loss, metrics = plackett_luce_loss(scores[ranking], num_rankings=totals.groups)
            else:
                chosen, rejected = pair_scores(scores, ranking)
                margin = batch.extras["margin"][ranking[:, 0]] if self.loss_name == "margin" else None
                loss, metrics = bradley_terry_loss(chosen, rejected, margin=margin,
                                                   num_pairs=totals.groups * k * (k - 1) / 2)
            share = batch.groups / totals.groups
        # Loss metrics are means over this micro-batch; the loop sums contributions over the step.
        return loss, {name: value * share for name, value in metrics.items()}

    def evaluate(self, model) -> Dict[str, float]:
        """Pairwise accuracy and mean margin (outcome: label accuracy) on the held-out batches."""
        if not self.eval_batches:
            return {}
        if self.loss_name == "outcome":
            return outcome_accuracy(model, self.eval_batches)
        return pairwise_accuracy(model, self.eval_batches)

    def state_dict(self) -> dict:
        return {"data": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["data"])


@torch.no_grad()
def pairwise_accuracy(model: ScalarHeadModel, batches: List[PackedBatch]) -> Dict[str, float]:
    """Share of pairs (i < j of each group) scored in order, and mean score margin, over grouped batches."""
    device = model.score.weight.device
    correct = torch.zeros((), device=device)
    margin = torch.zeros((), device=device)
    pairs = 0
    for batch in batches:
        batch = batch.to(device)
        chosen, rejected = pair_scores(model.scores(batch), batch.extras["ranking"])
        correct += (chosen > rejected).sum()
        margin += (chosen - rejected).sum()
        pairs += chosen.numel()
    return {"accuracy": correct.item() / max(pairs, 1), "margin": margin.item() / max(pairs, 1), "pairs": pairs}


@torch.no_grad()
def outcome_accuracy(model: ScalarHeadModel, batches: List[PackedBatch]) -> Dict[str, float]:
    """Share of sequences whose last-token logit has the sign of their 0/1 label."""
    device = model.score.weight.device
    correct = torch.zeros((), device=device)
    count = 0
    for batch in batches:
        batch = batch.to(device)
        correct += ((model.scores(batch) > 0) == (batch.extras["label"] > 0.5)).sum()
        count += batch.num_seqs
    return {"accuracy": correct.item() / max(count, 1)}


def outcome_examples(records: List[dict], tokenizer, *, max_len: int, overlong: str = "truncate"):
    """``prompt``/``completion``/``label`` records -> (examples, extras with a float "label", dropped)."""
    examples, extras, dropped = [], [], 0
    for i, record in enumerate(records):
        label = record.get("label") if isinstance(record, dict) else None
        if isinstance(label, bool):
            label = float(label)
        if label not in (0, 1, 0.0, 1.0):
            raise DataError(f"records[{i}]['label']: expected 0/1 or true/false for an outcome reward model, "
                             f"got {label!r}")
        example = tokenize_sft({"prompt": record["prompt"], "completion": record["completion"]}, tokenizer,
                               max_len=max_len, overlong=overlong)
        if example is None:
            dropped += 1
            continue
        examples.append(example)
        extras.append({"label": float(label)})
    return examples, extras, dropped


def reward_model_data(records: List[dict], tokenizer, *, loss: str, max_len: int, token_budget: int, seed: int,
                      overlong: str = "truncate", margin_key: str = "margin", shuffle: bool = True):
    """Tokenize and pack records for ``loss``: a GroupedDataset, or a PackedDataset for "outcome"."""
    if loss == "outcome":
        examples, extras, dropped = outcome_examples(records, tokenizer, max_len=max_len, overlong=overlong)
        if not examples:
            raise DataError(f"records: no example left to train on ({dropped} dropped)")
        return PackedDataset(examples, token_budget, seed=seed, shuffle=shuffle, extras=extras)
    examples, groups, kept = tokenize_groups(records, tokenizer, max_len=max_len, overlong=overlong)
    if not groups:
        raise DataError(f"records: no group left to train on ({len(records)} dropped by the overlong policy)")
    extras = None
    if loss == "margin":
        extras = [{"margin": 0.0} for _ in examples]
        for group, r in zip(groups, kept):
            value = records[r].get(margin_key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"records[{r}][{margin_key!r}]: loss 'margin' needs a number in each record, "
                                 f"got {value!r}")
            extras[group[0]]["margin"] = float(value)
    return GroupedDataset(examples, groups, token_budget, seed=seed, shuffle=shuffle, extras=extras)


def build_reward_model(cfg, tokenizer, device) -> ScalarHeadModel:
    """The scalar-head model of a run: cfg.model.name_or_path (RM, classifier or causal LM) or cfg.model.arch."""
    from fusedrl.models.causal_lm import build_policy

    rm_cfg = getattr(cfg, "reward_model", RewardModelConfig())
    if rm_cfg.kind == "process":  # a process reward model (fusedrl.stages.process_reward)
        from fusedrl.stages.process_reward import build_process_reward_model
        return build_process_reward_model(cfg, tokenizer, device)
    if cfg.model.name_or_path is not None:
        dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
        return ScalarHeadModel.from_pretrained(cfg.model.name_or_path, dtype=dtype, device=device,
                                               bias=rm_cfg.head_bias,
                                               gradient_checkpointing=cfg.model.gradient_checkpointing)
    return ScalarHeadModel.from_causal_lm(build_policy(cfg.model, tokenizer, device), bias=rm_cfg.head_bias)


def build_reward_model_stage(cfg, model, tokenizer) -> RewardModelStage:
    """The reward-model stage of a config with a ``reward_model`` table; ``model`` must be a ScalarHeadModel
    (build it with ``build_reward_model``)."""
    rm_cfg = getattr(cfg, "reward_model", None)
    if rm_cfg is None:
        raise ConfigError.message("reward_model", "reward_model: the config has no [reward_model] table "
                         "(use fusedrl.stages.configs_alignment.AlignmentTrainConfig)")
    check_section(rm_cfg, "reward_model")
    if rm_cfg.kind == "process":  # a process reward model (fusedrl.stages.process_reward)
        from fusedrl.stages.process_reward import build_process_reward_stage
        return build_process_reward_stage(cfg, model, tokenizer)
    if not isinstance(model, ScalarHeadModel):
        raise TypeError(f"model: the reward-model stage trains a ScalarHeadModel, got {type(model).__name__}; "
                        f"build it with fusedrl.stages.reward_model.build_reward_model(cfg, tokenizer, device)")
    data = cfg.data
    if not data.train:
        raise ConfigError.message("data.train", "data.train: the reward-model stage needs a training file (set data.train)")
    common = dict(loss=rm_cfg.loss, max_len=data.max_len, token_budget=data.token_budget, overlong=data.overlong,
                  margin_key=rm_cfg.margin_key)
    dataset = reward_model_data(load_records(data.train), tokenizer, seed=cfg.run.seed, shuffle=data.shuffle,
                                **common)
    eval_batches = None
    if data.eval:
        held_out = reward_model_data(load_records(data.eval), tokenizer, seed=0, shuffle=False, **common)
        limit = rm_cfg.eval_micro_batches
        eval_batches = (held_out.all_batches(limit) if isinstance(held_out, GroupedDataset)
                        else held_out.next_batches(limit or len(held_out)))
    logger.info("reward_model: loss %s, %d training micro-batches per epoch", rm_cfg.loss, len(dataset))
    return RewardModelStage(dataset, loss=rm_cfg.loss, micro_batches_per_step=data.micro_batches_per_step,
                            eval_batches=eval_batches)
