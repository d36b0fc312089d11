"""Direct alignment: DPO and its family on packed chosen/rejected pairs.

With per-sequence sums of completion log-probs logp (policy) and ref (frozen
reference), h = (logp_c - ref_c) - (logp_r - ref_r):

    dpo       -log sigmoid(beta h)                       cdpo   label-smoothed DPO (label_noise)
    ipo       (h - 1/(2 beta))^2                         rpo    DPO + alpha * NLL_avg(chosen)  ("DPO + NLL")
    apo_zero  -sigmoid(beta r_c) + sigmoid(beta r_r)     apo_down  sigmoid(beta r_c) - sigmoid(beta (r_c - r_r))
    kto       unpaired desirable / undesirable examples against a reference point z0
    simpo     -log sigmoid(beta (avg_c - avg_r) - gamma)           no reference
    orpo      NLL_avg(chosen) - lam log sigmoid(odds ratio)       no reference

The losses are `fusedrl.kernels`' (docs/objectives.md). Reference log-probs are
computed once, before training, by `reference_logprobs` with the fused
`linear_logprobs` kernel (no logits), stored with the examples (memory) and in
a safetensors cache keyed by the reference's and the data's identity (disk);
the reference model is released before the first step. With `dpo.reference`
unset the reference is the policy's own starting weights, so no second model
is ever held; SimPO and ORPO load no reference at all.

    fusedrl train CONFIG.toml     # [run] stage = "dpo"; a Qwen2-0.5B example: docs/alignment_stages.md
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fusedrl.config import ConfigError
from fusedrl.data.batch import PackedBatch
from fusedrl.data.records import Example, load_records, pack_examples, tokenize_sft
from fusedrl.stages.configs_alignment import DPO_LOSSES, REFERENCE_FREE, DPOConfig, check_section
from fusedrl.models.causal_lm import load_reference, token_logprobs
from fusedrl.models.lora import is_peft_model
from fusedrl.stages.base import BaseStage, StepTotals
from fusedrl.stages.cache import content_key, load_tensors, model_fingerprint, path_fingerprint, save_tensors
from fusedrl.stages.groups import GroupedDataset, sequence_sums, tokenize_groups
from fusedrl import kernels
from fusedrl.data.validate import DataError

logger = logging.getLogger("fusedrl")

_RENAME = {"accuracy": "reward_accuracy", "margin": "reward_margin"}


def loss_options(cfg: DPOConfig) -> Dict[str, float]:
    """The keyword arguments of the chosen loss function, from the config."""
    beta = {} if cfg.beta is None else {"beta": cfg.beta}
    return {"dpo": beta, "ipo": beta, "apo_zero": beta, "apo_down": beta,
            "cdpo": {**beta, "label_noise": cfg.label_noise},
            "rpo": {**beta, "alpha": cfg.alpha},
            "simpo": {**beta, "gamma": cfg.gamma},
            "orpo": {"lam": cfg.lam},
            "kto": {**beta, "desirable_weight": cfg.desirable_weight, "undesirable_weight": cfg.undesirable_weight},
            }[cfg.loss]


def preference_loss(name: str, logp: torch.Tensor, batch: PackedBatch, options: dict, num_units: float):
    """One of DPO_LOSSES on a grouped batch.

    Args:
        name: the loss.
        logp: (num_seqs,) float32 policy log-prob sums of the batch's sequences.
        batch: extras "ranking" (G, K), "completion_len" (num_seqs,), and for
            reference-based losses "ref_logp" (num_seqs,); KTO also "desirable".
        options: keyword arguments of the loss (beta, ...).
        num_units: the step's global number of pairs (KTO: examples).
    Returns:
        (loss, metrics) of the kernel loss.
    """
    ranking = batch.extras["ranking"]
    first = ranking[:, 0]
    length = batch.extras["completion_len"]
    ref = batch.extras.get("ref_logp")
    if name == "kto":
        kl = {}
        if ranking.shape[1] > 1:  # [example, mismatched example]: the mismatched one estimates z0
            kl = {"kl_policy_logp": logp[ranking[:, 1]], "kl_ref_logp": ref[ranking[:, 1]]}
        return kernels.kto_loss(logp[first], ref[first], batch.extras["desirable"][first], num_pairs=num_units,
                                **kl, **options)
    second = ranking[:, 1]
    if name in REFERENCE_FREE:
        fn = kernels.simpo_loss if name == "simpo" else kernels.orpo_loss
        return fn(logp[first], logp[second], length[first], length[second], num_pairs=num_units, **options)
    refs = (ref[first], ref[second])
    if name == "rpo":
        return kernels.rpo_loss(logp[first], logp[second], *refs, length[first], num_pairs=num_units, **options)
    fn = {"dpo": kernels.dpo_loss, "cdpo": kernels.cdpo_loss, "ipo": kernels.ipo_loss,
          "apo_zero": kernels.apo_zero_loss, "apo_down": kernels.apo_down_loss}[name]
    return fn(logp[first], logp[second], *refs, num_pairs=num_units, **options)


class DPOStage(BaseStage):
    """The direct-alignment stage.

    Args:
        dataset: a `GroupedDataset` of [chosen, rejected] pairs (KTO: [example] or
            [example, mismatched]) whose extras hold "ref_logp" unless the loss is reference-free.
        loss: one of DPO_LOSSES; options: its keyword arguments (see `loss_options`).
        micro_batches_per_step: micro-batches per optimizer step.
        eval_batches: held-out batches of the same kind, or None.
    """

    name = "dpo"

    def __init__(self, dataset: GroupedDataset, *, loss: str = "dpo", options: Optional[dict] = None,
                 micro_batches_per_step: int = 1, eval_batches: Optional[List[PackedBatch]] = None):
        if loss not in DPO_LOSSES:
            raise ValueError(f"loss: expected one of {DPO_LOSSES}, got {loss!r}")
        if not isinstance(dataset, GroupedDataset):
            raise TypeError(f"dataset: expected a GroupedDataset, got {type(dataset).__name__}")
        if loss != "kto" and dataset.group_size != 2:
            raise ValueError(f"dataset: loss {loss!r} needs [chosen, rejected] pairs, "
                             f"got groups of {dataset.group_size}")
        if loss not in REFERENCE_FREE and "ref_logp" not in dataset.extras[0]:
            raise ValueError(f"dataset: loss {loss!r} needs reference log-probs ('ref_logp' extras); "
                             f"compute them with reference_logprobs(...)")
        if isinstance(micro_batches_per_step, bool) or not isinstance(micro_batches_per_step, int) \
                or micro_batches_per_step < 1:
            raise ValueError(f"micro_batches_per_step: expected an int >= 1, got {micro_batches_per_step!r}")
        self.dataset, self.loss_name, self.options = dataset, loss, dict(options or {})
        self.micro_batches_per_step = micro_batches_per_step
        self.eval_batches = eval_batches or []

    def micro_batches(self, model, step: int) -> List[PackedBatch]:
        return self.dataset.next_batches(self.micro_batches_per_step)

    def loss(self, model, batch: PackedBatch, totals: StepTotals):
        """(loss, metrics): sums over this micro-batch's pairs divided by the step's pairs (groups)."""
        token_logp = token_logprobs(model, batch)  # (total,) float32, 0 off the completion
        logp = sequence_sums(token_logp, batch.cu_seqlens, batch.total)  # (num_seqs,)
        loss, metrics = preference_loss(self.loss_name, logp, batch, self.options, totals.groups)
        share = batch.groups / totals.groups  # metrics are this micro-batch's means: make them additive
        return loss, {_RENAME.get(n, n): v * share for n, v in metrics.items()}

    def evaluate(self, model) -> Dict[str, float]:
        """Loss, reward accuracy, margin and chosen/rejected rewards on the held-out pairs."""
        if not self.eval_batches:
            return {}
        device = next(model.parameters()).device
        totals = StepTotals(tokens=float(sum(b.num_tokens for b in self.eval_batches)),
                            sequences=float(sum(b.num_seqs for b in self.eval_batches)),
                            groups=float(sum(b.groups for b in self.eval_batches)))
        sums: Dict[str, torch.Tensor] = {}
        for batch in self.eval_batches:
            loss, metrics = self.loss(model, batch.to(device), totals)
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        names = list(sums)
        return dict(zip(names, torch.stack([sums[n] for n in names]).tolist()))

    def state_dict(self) -> dict:
        return {"data": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["data"])


@torch.no_grad()
def reference_logprobs(model, examples: List[Example], token_budget: int, *, cache_dir=None,
                       identity=None) -> torch.Tensor:
    """Per-example sums of completion log-probs under ``model``, computed once (and cached on disk).

    Args:
        model: the reference causal LM (run in eval mode, no grad; its mode is restored).
        examples: the documents (labels mark the completion tokens).
        token_budget: tokens per packed forward.
        cache_dir: folder of the safetensors cache, or None for no disk cache.
        identity: what identifies the reference (default: a fingerprint of its weights).
    Returns:
        (len(examples),) float32 on the CPU, in example order.
    """
    path = None
    if cache_dir is not None:
        path = _cache_path(cache_dir, identity if identity is not None else model_fingerprint(model), examples)
        cached = _read_cache(path, len(examples))
        if cached is not None:
            return cached
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(len(examples), dtype=torch.float32, device=device)
    try:
        for batch in pack_examples(examples, token_budget):
            batch = batch.to(device)
            sums = sequence_sums(token_logprobs(model, batch), batch.cu_seqlens, batch.total)
            out[batch.extras["example_index"]] = sums.float()
    finally:
        model.train(was_training)
    out = out.cpu()
    if path is not None:
        save_tensors(path, {"ref_logp": out})
    return out


def kto_data(records: List[dict], tokenizer, *, max_len: int, overlong: str, mismatched: bool):
    """Unpaired (``prompt``/``completion``/``label``) or preference records -> (examples, groups, extras).

    Preference records give a desirable (chosen) and an undesirable (rejected)
    example. With ``mismatched``, each example's group also holds its prompt
    with the completion of the next example of another prompt (for z0).
    """
    items = []  # (prompt, completion, desirable)
    for i, record in enumerate(records):
        if "chosen" in record and "rejected" in record:
            items += [(record["prompt"], record["chosen"], 1.0), (record["prompt"], record["rejected"], 0.0)]
        elif "completion" in record and isinstance(record.get("label"), (bool, int, float)):
            items.append((record["prompt"], record["completion"], float(bool(record["label"]))))
        else:
            raise DataError(f"records[{i}]: KTO needs prompt/completion/label or prompt/chosen/rejected, "
                             f"got keys {sorted(record)}")
    examples, groups, extras = [], [], []
    for i, (prompt, completion, desirable) in enumerate(items):
        texts = [(prompt, completion)]
        if mismatched:
            j = next((j for j in range(i + 1, i + len(items)) if items[j % len(items)][0] != prompt), None)
            if j is None:
                raise ConfigError.message("dpo.kto_kl", "dpo.kto_kl: every example has the same prompt, so no mismatched pair exists; "
                                 "set dpo.kto_kl = false")
            texts.append((prompt, items[j % len(items)][1]))
        members = [tokenize_sft({"prompt": p, "completion": c}, tokenizer, max_len=max_len, overlong=overlong,
                                train_on="last_assistant") for p, c in texts]
        if any(m is None for m in members):
            continue
        groups.append(list(range(len(examples), len(examples) + len(members))))
        examples += members
        extras += [{"desirable": desirable}] * len(members)
    return examples, groups, extras


def dpo_dataset(records, tokenizer, cfg: DPOConfig, *, max_len: int, token_budget: int, seed: int,
                overlong: str = "truncate", shuffle: bool = True) -> GroupedDataset:
    """Tokenized, grouped records for ``cfg.loss`` (reference log-probs not yet attached)."""
    if cfg.loss == "kto":
        examples, groups, extras = kto_data(records, tokenizer, max_len=max_len, overlong=overlong,
                                            mismatched=cfg.kto_kl)
    else:
        examples, groups, _ = tokenize_groups(records, tokenizer, max_len=max_len, overlong=overlong)
        extras = None
        if groups and len(groups[0]) != 2:
            raise DataError(f"records: dpo.loss {cfg.loss!r} needs prompt/chosen/rejected pairs, got groups of "
                             f"{len(groups[0])} completions")
    if not groups:
        raise DataError(f"records: no example left after tokenizing {len(records)} records (max_len {max_len})")
    return GroupedDataset(examples, groups, token_budget, seed=seed, shuffle=shuffle, extras=extras)


def attach_reference(datasets: List[GroupedDataset], ref_logp: torch.Tensor) -> None:
    """Store per-example reference sums (concatenated over ``datasets``, in order) as "ref_logp" extras."""
    offset = 0
    for dataset in datasets:
        for i, extra in enumerate(dataset.extras):
            extra["ref_logp"] = float(ref_logp[offset + i])
        offset += len(dataset.examples)


def build_dpo_stage(cfg, model, tokenizer) -> DPOStage:
    """The direct-alignment stage of a config with a ``dpo`` table (reference log-probs computed here)."""
    dpo_cfg = getattr(cfg, "dpo", None)
    if dpo_cfg is None:
        raise ConfigError.message("dpo", "dpo: the config has no [dpo] table "
                         "(use fusedrl.stages.configs_alignment.AlignmentTrainConfig)")
    check_section(dpo_cfg, "dpo")
    data = cfg.data
    if not data.train:
        raise ConfigError.message("data.train", "data.train: the DPO stage needs a preference file (set data.train)")
    common = dict(max_len=data.max_len, token_budget=data.token_budget, overlong=data.overlong)
    datasets = [dpo_dataset(load_records(data.train), tokenizer, dpo_cfg, seed=cfg.run.seed, shuffle=data.shuffle,
                            **common)]
    if data.eval:
        datasets.append(dpo_dataset(load_records(data.eval), tokenizer, dpo_cfg, seed=0, shuffle=False, **common))
    if dpo_cfg.loss not in REFERENCE_FREE:
        cache_dir = dpo_cfg.ref_cache_dir or str(Path(cfg.run.out_dir) / "ref_cache")
        examples = [e for d in datasets for e in d.examples]
        attach_reference(datasets, compute_reference(dpo_cfg, model, examples, data.token_budget, cache_dir,
                                                     cfg.model))
    eval_batches = datasets[1].all_batches(dpo_cfg.eval_micro_batches) if len(datasets) > 1 else None
    return DPOStage(datasets[0], loss=dpo_cfg.loss, options=loss_options(dpo_cfg),
                    micro_batches_per_step=data.micro_batches_per_step, eval_batches=eval_batches)


def compute_reference(dpo_cfg: DPOConfig, policy, examples: List[Example], token_budget: int, cache_dir,
                      model_cfg) -> torch.Tensor:
    """Reference sums from ``dpo_cfg.reference`` (loaded, used, released) or from ``policy``'s current weights.

    model_cfg: the [model] table (the reference is loaded with its dtype).
    """
    if dpo_cfg.reference is None:  # the policy's starting weights (LoRA: the policy with its adapters off)
        return reference_logprobs(load_reference(model_cfg, None, policy) if is_peft_model(policy) else policy,
                                  examples, token_budget, cache_dir=cache_dir)
    identity = path_fingerprint(dpo_cfg.reference)
    device = next(policy.parameters()).device
    reference = None
    try:
        cached = None if cache_dir is None else _read_cache(_cache_path(cache_dir, identity, examples), len(examples))
        if cached is not None:  # the reference is never loaded
            return cached
        reference = load_reference(model_cfg, dpo_cfg.reference, policy)
        return reference_logprobs(reference, examples, token_budget, cache_dir=cache_dir, identity=identity)
    finally:
        del reference  # released before training: no reference model is held while the policy trains
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _cache_path(cache_dir, identity, examples: List[Example]) -> Path:
    key = content_key({"model": identity, "examples": [[e.input_ids, e.labels] for e in examples]})
    return Path(cache_dir) / f"ref_logp_{key}.safetensors"


def _read_cache(path: Path, count: int) -> Optional[torch.Tensor]:
    cached = load_tensors(path)
    if cached is not None and cached.get("ref_logp") is not None and cached["ref_logp"].numel() == count:
        logger.info("reference log-probs: %d from cache %s", count, path)
        return cached["ref_logp"]
    return None
