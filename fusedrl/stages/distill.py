"""Knowledge distillation from a teacher's dense next-token distribution: on-policy (GKD), mixed, self (SDPO).

Per step the stage builds B samples (prompt + completion), packs them, and the loss of each
micro-batch is the per-token divergence between the student's and the teacher's next-token
distributions on the completion tokens (`fusedrl.kernels.linear_distill_loss`, straight from
both models' hidden states and LM heads, no logits):

    mode = "on_policy"   the student samples P x G completions (GKD with lambda = 1)
    mode = "mixed"       each step trains on the student's samples with probability `lam`, else on
                         P records' teacher-written `completion` fields from data.train (GKD's lambda)
    mode = "self"        SDPO: the student samples G completions per prompt, rollout.verifier marks the
                         correct ones; the teacher is the same model (no gradient), prompted with
                         `demo_template` showing a correct sibling of the same group (another correct
                         one when there is, else the sample itself). Groups without any correct
                         completion are skipped and refilled from fresh prompts (resample_rounds).

The teacher (modes on_policy / mixed) is any causal LM with the student's vocabulary, loaded
from distill.teacher when the stage is built, frozen, optionally offloaded to the CPU between
uses (`fusedrl.rollout.teacher`), and never part of `state_dict()`. Its hidden states are
computed in `micro_batches` (one teacher forward per micro-batch) and travel in
`batch.extras["teacher_hidden"]` on the model's device.

    fusedrl train examples/distill_tiny.toml          # [run] stage = "distill", [rollout], [distill]
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fusedrl.data.batch import IGNORE_INDEX, PackedBatch
from fusedrl.data.packed import Example, pack_balanced
from fusedrl.kernels import linear_distill_loss
from fusedrl.models.causal_lm import hidden_states, lm_head
from fusedrl.rollout.completions import make_sampler, sample_rollout_divided
from fusedrl.rollout.experience import PromptSampler, RewardSource, Rollout, Timer
from fusedrl.rollout.sampling import SamplingParams
from fusedrl.rollout.teacher import Teacher, aligned_hidden
from fusedrl.stages.base import BaseStage, StepTotals, sampling_generator
from fusedrl.stages.configs_distill import DistillStageConfig, check_distill
from fusedrl.stages.configs_rl import RolloutConfig
from fusedrl.data.validate import DataError

logger = logging.getLogger("fusedrl")

Sample = Tuple[List[int], List[int], List[int]]  # (student prompt, completion, teacher prompt)


def completion_pairs(records: Sequence[dict], tokenizer, max_len: int) -> List[Optional[Tuple[List[int], List[int]]]]:
    """(prompt ids, completion ids) of each `prompt`/`completion` record, None when it has no completion."""
    from fusedrl.data.records import tokenize_sft

    out = []
    for record in records:
        if "completion" not in record:
            out.append(None)
            continue
        example = tokenize_sft({"prompt": record["prompt"], "completion": record["completion"]}, tokenizer,
                               max_len=max_len, train_on="last_assistant")
        first = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), None) if example else None
        out.append(None if not first else (example.input_ids[:first], example.input_ids[first:]))
    return out


class DistillStage(BaseStage):
    """The distillation stage (see the module docstring).

    Args:
        records: prompt records (mode "mixed": those with a `completion` also serve as data batches).
        tokenizer: renders prompts and decodes samples.
        rollout: the [rollout] table (sampling); distill: the [distill] table.
        teacher: the frozen Teacher (None for mode "self").
        rewards: the verifier reward source (required for mode "self"; else optional, for metrics).
        data_pairs: mode "mixed": completion_pairs(records, ...) (tokenized teacher-written completions).
        eval_records: held-out prompts for `evaluate`, or None.
        seed: prompt order, sampling and the mixed-mode coin.
    """

    name = "distill"
    divides_rollout = True  # under torchrun each rank samples its share (fusedrl.train.dist_step)

    def __init__(self, *, records: List[dict], tokenizer, rollout: RolloutConfig, distill: DistillStageConfig,
                 teacher: Optional[Teacher] = None, rewards: Optional[RewardSource] = None,
                 data_pairs: Optional[list] = None, eval_records: Optional[List[dict]] = None, seed: int = 0):
        check_distill(distill, rollout)
        if not records:
            raise DataError("records: the distill stage needs at least one prompt record")
        if distill.mode != "self" and teacher is None:
            raise ValueError(f"teacher: mode {distill.mode!r} needs a Teacher (see fusedrl.rollout.teacher)")
        if distill.mode == "self" and rewards is None:
            raise ValueError("rewards: mode 'self' needs a verifier reward source to find correct siblings")
        self.records, self.tokenizer, self.rollout, self.cfg = list(records), tokenizer, rollout, distill
        self.teacher, self.rewards, self.eval_records = teacher, rewards, list(eval_records or [])
        self.data_index = [i for i, p in enumerate(data_pairs or []) if p is not None]
        if distill.mode == "mixed" and distill.lam < 1 and not self.data_index:
            raise DataError("data.train: mode 'mixed' needs records with a teacher-written 'completion'")
        self.data_pairs = data_pairs or []
        self.prompts = PromptSampler(len(self.records), seed)
        self.data_sampler = PromptSampler(len(self.data_index), seed + 1) if self.data_index else None
        self.seed = seed
        self.generator: Optional[torch.Generator] = None
        self._generator_state: Optional[torch.Tensor] = None
        self._host: Dict[str, float] = {}

    # ------------------------------------------------------------------ the step's batches

    def _on_policy_step(self, step: int) -> bool:
        if self.cfg.mode != "mixed":
            return True
        coin = torch.rand((), generator=torch.Generator().manual_seed(self.seed * 7_919 + step)).item()
        return coin < self.cfg.lam

    def micro_batches(self, model, step: int) -> List[PackedBatch]:
        timer, self._host = Timer(), {}
        if not self._on_policy_step(step):
            samples = self._data_samples()
        elif self.cfg.mode == "self":
            with timer("generate"):
                samples = self._self_samples(model)
        else:
            with timer("generate"):
                samples = self._student_samples(model, self.prompts.next(self.rollout.prompts_per_rollout))
        self._host["on_policy"] = float(self._on_policy_step(step))
        with timer("teacher"):
            batches = self._teacher_batches(model, samples)
        self._host.update({f"time_{k}": v for k, v in timer.seconds.items()})
        self._host["response_len"] = sum(len(s[1]) for s in samples) / max(len(samples), 1)
        return batches

    def _sample(self, model, indices: Sequence[int], group_size: int) -> Rollout:
        r = self.rollout
        sampler = make_sampler(r.backend, model, self.tokenizer, generator=self._sampling_generator(model))
        params = SamplingParams(n=group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                max_new_tokens=r.max_new_tokens, seed=self.seed)
        rollout, mine = sample_rollout_divided(sampler, self.tokenizer, self.records, indices, params)
        self._host["rollout_prompts_this_rank"] = self._host.get("rollout_prompts_this_rank", 0.0) + mine
        return rollout

    def _student_samples(self, model, indices: Sequence[int]) -> List[Sample]:
        rollout = self._sample(model, indices, self.rollout.group_size)
        if self.rewards is not None and rollout.completions:
            accuracy = self.rewards.accuracy(rollout, self.records)
            if accuracy is not None:
                self._host["accuracy"] = accuracy.mean().item()
        return [(list(p), list(c), list(p)) for p, c in zip(rollout.prompt_ids, rollout.completion_ids) if c]

    def _data_samples(self) -> List[Sample]:
        picks = self.data_sampler.next(self.rollout.prompts_per_rollout)
        return [(list(p), list(c), list(p)) for p, c in (self.data_pairs[self.data_index[i]] for i in picks)]

    def _self_samples(self, model) -> List[Sample]:
        """SDPO samples: groups with a correct completion; each sample's teacher prompt shows a correct sibling."""
        from fusedrl.data.records import tokenize_prompt

        r, g = self.rollout, self.rollout.group_size
        samples: List[Sample] = []
        kept = skipped = 0
        for _ in range(1 + self.cfg.resample_rounds):
            rollout = self._sample(model, self.prompts.next(r.prompts_per_rollout - kept), g)
            correct = (self.rewards(rollout, self.records) >= self.cfg.correct_threshold).view(-1, g).tolist()
            for group, flags in enumerate(correct):
                if not any(flags):
                    skipped += 1
                    continue
                kept += 1
                record = self.records[rollout.record_index[group * g]]
                for j in range(g):
                    i = group * g + j
                    demo = next((k for k in range(g) if flags[k] and k != j), j)
                    text = self.cfg.demo_template.format(prompt=record["prompt"],
                                                         demo=rollout.completions[group * g + demo])
                    if rollout.completion_ids[i]:
                        samples.append((list(rollout.prompt_ids[i]), list(rollout.completion_ids[i]),
                                        tokenize_prompt({"prompt": text}, self.tokenizer)))
            if kept >= r.prompts_per_rollout:
                break
        self._host.update({"groups_kept": float(kept), "groups_skipped": float(skipped)})
        if not samples:
            logger.warning("distill: no group had a correct completion after %d rounds; the step trains nothing",
                           1 + self.cfg.resample_rounds)
        return samples

    def _teacher_batches(self, model, samples: List[Sample]) -> List[PackedBatch]:
        """Pack the samples; attach the teacher's aligned hidden states to each batch."""
        device = next(model.parameters()).device
        if not samples:  # keep the step well-formed: one untrained token
            examples = [Example([self.tokenizer.eos_token_id] * 2, [IGNORE_INDEX] * 2)]
            batch = pack_balanced(examples, self.rollout.token_budget)[0]
            h = model.config.hidden_size if self.cfg.mode == "self" else self.teacher.model.config.hidden_size
            batch.extras["teacher_hidden"] = torch.zeros(batch.total, h, device=device,
                                                         dtype=next(model.parameters()).dtype)
            return [batch]
        examples = [Example(p + c, [IGNORE_INDEX] * len(p) + c) for p, c, _ in samples]
        batches = pack_balanced(examples, self.rollout.token_budget)
        source = model if self.cfg.mode == "self" else self.teacher.model
        ctx = self.teacher.on_device() if self.teacher is not None and self.cfg.mode != "self" else _null()
        with ctx:
            for batch in batches:
                members = batch.extras["example_index"].tolist()
                batch.extras["teacher_hidden"] = aligned_hidden(
                    source, batch, [samples[i][2] for i in members], [len(samples[i][0]) for i in members], device)
        return batches

    def _sampling_generator(self, model) -> torch.Generator:
        return sampling_generator(self, model)

    # ------------------------------------------------------------------ the loss

    def _teacher_head(self, model):
        if self.cfg.mode == "self":
            weight, bias = lm_head(model)
            return weight.detach(), None if bias is None else bias.detach()
        return self.teacher.head()

    def loss(self, model, batch: PackedBatch, totals: StepTotals):
        weight, bias = lm_head(model)
        t_weight, t_bias = self._teacher_head(model)
        token_mean = self.cfg.aggregation == "token_mean"
        loss, metrics = linear_distill_loss(
            hidden_states(model, batch), weight, batch.extras["teacher_hidden"], t_weight, student_bias=bias,
            teacher_bias=t_bias, labels=batch.labels, cu_seqlens=batch.cu_seqlens, kind=self.cfg.kind,
            beta=self.cfg.beta, temperature=self.cfg.temperature, top_k=self.cfg.top_k or None,
            aggregation=self.cfg.aggregation, max_len=self.rollout.max_new_tokens,
            num_tokens=totals.tokens if token_mean else None, num_seqs=None if token_mean else totals.sequences)
        share = batch.num_tokens / totals.tokens
        return loss, {"divergence": metrics["divergence"] * share}

    # ------------------------------------------------------------------ host side

    def host_metrics(self) -> Dict[str, float]:
        return dict(self._host)

    @torch.no_grad()
    def evaluate(self, model) -> Dict[str, float]:
        """Greedy completions of up to rollout.eval_prompts held-out prompts: the divergence to the teacher on
        them (modes with a teacher model), reward and accuracy when a verifier is set."""
        if not self.eval_records:
            return {}
        from fusedrl.data.records import tokenize_prompt
        from fusedrl.rollout.hf import generate

        records = self.eval_records[:self.rollout.eval_prompts or len(self.eval_records)]
        prompts = [tokenize_prompt(r, self.tokenizer) for r in records]
        out = generate(model, prompts, max_new_tokens=self.rollout.max_new_tokens, greedy=True,
                       eos_token_id=self.tokenizer.eos_token_id, tokenizer=self.tokenizer)
        result: Dict[str, float] = {}
        if self.cfg.mode != "self":
            result["divergence"] = self.divergence(model, [(p, list(c), p) for p, c in zip(prompts, out.tokens) if c])
        if self.rewards is not None:
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
            rollout = Rollout(prompts, out.tokens, out.logprobs, list(out.finished), list(range(len(records))),
                              texts, 1)
            result["reward"] = self.rewards(rollout, records).mean().item()
            accuracy = self.rewards.accuracy(rollout, records)
            if accuracy is not None:
                result["accuracy"] = accuracy.mean().item()
        return result

    @torch.no_grad()
    def divergence(self, model, samples: List[Sample]) -> float:
        """Mean per-token divergence (distill.kind) to the teacher over the completion tokens of `samples`."""
        if not samples:
            return 0.0
        device = next(model.parameters()).device
        total = count = 0.0
        for batch in self._teacher_batches(model, samples):
            batch = batch.to(device)
            _, metrics = self.loss(model, batch, StepTotals(max(batch.num_tokens, 1), batch.num_seqs, batch.num_seqs))
            total += metrics["divergence"].item() * max(batch.num_tokens, 1)
            count += batch.num_tokens
        return total / max(count, 1)

    def state_dict(self) -> dict:
        generator = self.generator.get_state() if self.generator is not None else self._generator_state
        state = {"prompts": self.prompts.state_dict(), "generator": generator}
        if self.data_sampler is not None:
            state["data"] = self.data_sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.generator, self._generator_state = None, state["generator"]
        if self.data_sampler is not None and "data" in state:
            self.data_sampler.load_state_dict(state["data"])


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def build_distill_stage(cfg, model, tokenizer) -> DistillStage:
    """The stage of a `DistillTrainConfig`: [rollout], [distill], data.train / data.eval prompt records."""
    from fusedrl.rollout.experience import RewardSource
    from fusedrl.rollout.teacher import load_teacher
    from fusedrl.stages.policy_gradient import load_prompt_records

    d, r = cfg.distill, cfg.rollout
    check_distill(d, r)
    records, eval_records = load_prompt_records(cfg)
    device = next(model.parameters()).device
    teacher = None
    if d.mode != "self":
        teacher = load_teacher(d.teacher, device=device, vocab_size=lm_head(model)[0].shape[0],
                               dtype=cfg.model.dtype, offload=d.offload_teacher)
    rewards = None
    if r.verifier is not None:
        rewards = RewardSource(verifier=r.verifier, token_budget=r.token_budget,
                               accuracy_verifier=r.accuracy_verifier)
    pairs = completion_pairs(records, tokenizer, cfg.data.max_len) if d.mode == "mixed" else None
    return DistillStage(records=records, tokenizer=tokenizer, rollout=r, distill=d, teacher=teacher, rewards=rewards,
                        data_pairs=pairs, eval_records=eval_records, seed=cfg.run.seed)
