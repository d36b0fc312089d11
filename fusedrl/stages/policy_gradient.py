"""Policy-gradient RL with group or baseline advantages: GRPO, Dr. GRPO, DAPO, GSPO, CISPO, SAPO, RLOO, REINFORCE.

One stage class; the algorithm is a row of `ALGORITHMS` choosing the advantage
estimator and the `policy_loss` options (docs/objectives.md has the math):

    algo       advantages                       loss (policy_loss algo, aggregation, clip)
    grpo       (R - mean_g R) / (std_g R + eps)  grpo, seq_mean, [0.8, 1.2]
    dr_grpo    R - mean_g R                      grpo, seq_mean_fixed_len (L_max), [0.8, 1.2]
    dapo       as grpo                           grpo, token_mean, [0.8, 1.28]; dynamic sampling; overlong shaping
    gspo       as grpo                           gspo (sequence ratio), seq_mean, [1 - 3e-4, 1 + 4e-4]
    cispo      as grpo                           cispo (sg(clipped ratio) * A * logp), token_mean, upper 1 + 5
    sapo       as grpo                           sapo (soft gate), token_mean
    rloo       R - mean_{j != i} R (leave-one-out)  reinforce (-A logp), token_mean
    reinforce  R - b, b a running mean (or EMA)  reinforce, token_mean

Every [pg] field left at None takes the row's value.

Rollout reuse. `micro_batches(model, step)` gives one optimizer step. The stage
keeps the current rollout batch (an `Experience`) and draws a new one every
K = iterations * mini_batches steps: step s uses pass (s mod K) // mini_batches
over the batch, mini-batch (s mod K) mod mini_batches of that pass's seeded
permutation. The experience is part of `state_dict()`, so a run resumed in the
middle of a rollout batch continues with the same samples.

Per rollout (timed as generate / score / logprobs; the update is timed from the
end of `micro_batches` to `host_metrics`): sample P prompts x G completions,
score, shape, drop constant-reward groups when dynamic sampling is on (refilling
from fresh prompts for up to `resample_rounds` rounds), compute old log-probs
(only when K > 1 or truncated IS needs them; otherwise old = sg(logp), exact
for one on-policy step) and reference log-probs (only when beta > 0: with
beta = 0 no reference model is ever built) with the fused `linear_logprobs`,
fold the KL into the reward when kl_in = "reward", compute advantages.

The loss: `fusedrl.kernels.linear_policy_loss` on the final hidden states (the
LM head runs inside the fused log-prob kernel, no logits), normalised by the
step's totals the loop passes in (tokens for token_mean, sequences otherwise);
without stored old log-probs it is on-policy (old = sg(logp)). This is the path
`fusedrl bench --only grpo` measures.

The reference model (beta > 0) is built with the stage, from the config
(`load_reference`: pg.ref_model, else model.name_or_path, else a frozen copy of
the policy before any training), and is never saved in checkpoints.

Run it (docs/rl_stages.md has a full config):

    fusedrl train grpo.toml                              # [run] stage = "grpo", [rollout], [pg]
    fusedrl train grpo.toml --run.stage=dapo --pg.beta=0.01
    torchrun --nproc-per-node 8 -m fusedrl train grpo.toml   # the same prompts and samples as one process
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

import torch

from fusedrl.config import ConfigError
from fusedrl.data.records import DataError
from fusedrl.data.batch import PackedBatch
from fusedrl.rollout.experience import (Experience, PromptSampler, RewardSource, Rollout, Timer, constant_groups,
                                    rollout_metrics, shape_rewards, token_forward)
from fusedrl.rollout.completions import make_sampler, sample_rollout, sample_rollout_divided
from fusedrl.rollout.sampling import SamplingParams
from fusedrl.stages.configs_rl import (ALGORITHMS, Advantage, ResolvedOptions, RolloutConfig, check_rollout,
                                              resolve_pg_options)
from fusedrl.stages.base import BaseStage, StepTotals, sampling_generator
from fusedrl.stages.groups import sequence_sums
from fusedrl.kernels import (RunningMeanBaseline, dr_grpo_advantages, grpo_advantages, kl_penalty,
                             linear_policy_loss, rloo_advantages, whiten)
from fusedrl.models.causal_lm import hidden_states, lm_head, load_reference, token_logprobs
from fusedrl.kernels import linear_logprobs

logger = logging.getLogger("fusedrl")


class PolicyGradientStage(BaseStage):
    """The RL stage of the loop for every algorithm in ALGORITHMS (PPO subclasses it).

    Args:
        records: prompt records ({"prompt": ..., plus fields the verifier reads, e.g. "answer"}).
        tokenizer: renders prompts (chat template) and decodes completions.
        rollout: the [rollout] table.
        options: resolved algorithm options (`resolve_pg_options`).
        rewards: the reward source (verifier or reward model).
        eval_records: held-out prompt records for `evaluate` (greedy), or None.
        ref_model: the frozen reference model (required when beta > 0; with beta = 0 none is kept).
        seed: prompt order and sampling seed.
        baseline_decay: REINFORCE's baseline (None: running mean).
    """

    name = "pg"
    value_forward = False  # PPO: a value-model forward at every rollout
    divides_rollout = True  # under torchrun each rank samples its share (fusedrl.train.dist_step)

    def __init__(self, *, records: List[dict], tokenizer, rollout: RolloutConfig, options: ResolvedOptions,
                 rewards: RewardSource, eval_records: Optional[List[dict]] = None, ref_model=None, seed: int = 0,
                 baseline_decay: Optional[float] = None, name: Optional[str] = None, distill_teacher=None,
                 distill_coef: float = 0.0):
        check_rollout(rollout, require_reward=False)
        if not records:
            raise DataError("records: the RL stage needs at least one prompt record")
        self.name = name or self.name
        self.records, self.tokenizer, self.rollout, self.opt = list(records), tokenizer, rollout, options
        self.rewards, self.eval_records = rewards, list(eval_records or [])
        self.normalize_by = "tokens" if options.aggregation == "token_mean" else "sequences"
        if options.beta > 0 and ref_model is None:
            raise ValueError("ref_model: beta > 0 needs a frozen reference model (see load_reference)")
        self.ref_model = ref_model if options.beta > 0 else None
        if distill_coef and distill_teacher is None:
            raise ValueError("distill_teacher: distill_coef > 0 needs a teacher (fusedrl.rollout.teacher)")
        # on-policy distillation as a dense reward (None / 0: off)
        self.distill_teacher, self.distill_coef = (distill_teacher, float(distill_coef)) if distill_coef else (None, 0.)
        self.prompts = PromptSampler(len(self.records), seed)
        self.seed = seed
        self.generator: Optional[torch.Generator] = None  # on the policy's device, made at the first rollout
        self._generator_state: Optional[torch.Tensor] = None  # restored from a checkpoint, applied on creation
        self.baseline = RunningMeanBaseline(baseline_decay) if options.advantage is Advantage.REINFORCE else None
        self.exp: Optional[Experience] = None
        self.rollouts_done = 0
        self._host: Dict[str, float] = {}
        self._update_tokens, self._batches_ready_at = 0, None  # host metrics of the step

    # ------------------------------------------------------------------ the step's batches

    def micro_batches(self, model, step: int) -> List[PackedBatch]:
        phase = step % self.opt.steps_per_rollout
        timer = Timer()
        self._host = {}
        if phase == 0 or self.exp is None:
            if phase != 0:
                raise RuntimeError(f"{self.name}: step {step} reuses a rollout batch that is not in memory; "
                                   "resume from the checkpoint's stage state")
            self.exp = self._make_experience(model, timer)
            self.rollouts_done += 1
        indices = self._mini_batch_indices(phase)
        batches = self.exp.pack(indices, self.rollout.token_budget)
        self._update_tokens = sum(b.num_tokens for b in batches)
        self._host.update(self._timing_metrics(timer))
        self._host["rollout_phase"] = float(phase)
        self._first_pass = phase == 0  # the policy still has the sampler's weights: report ratio_ne_1_frac
        self._batches_ready_at = time.perf_counter()
        return batches

    def _mini_batch_indices(self, phase: int) -> List[int]:
        n, parts = len(self.exp), self.opt.mini_batches
        epoch, part = divmod(phase, parts)
        order = list(range(n))
        if parts > 1 or epoch > 0:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rollouts_done * 101 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        chunks = [c for c in torch.tensor(order).chunk(min(parts, n))]
        return chunks[part % len(chunks)].tolist()

    def _make_experience(self, model, timer: Timer) -> Experience:
        rollout, everything, kept, dropped = self._sample_and_score(model, timer)
        exp = Experience.from_rollout(rollout)
        device = next(model.parameters()).device
        tau = self.rollout.temperature
        need_old = self.opt.steps_per_rollout > 1 or self.opt.tis_cap is not None
        budget, forwards = self.rollout.token_budget, 0
        if need_old or self.opt.beta > 0 or self.value_forward:
            with timer("logprobs"):
                if need_old or self.opt.beta > 0:
                    exp.tok["old_logp"] = token_forward(exp, lambda b: token_logprobs(model, b, tau), budget, device)
                    forwards += 1
                if self.opt.beta > 0:
                    ref = self.ref_model
                    exp.tok["ref_logp"] = token_forward(exp, lambda b: token_logprobs(ref, b, tau), budget, device)
                    forwards += 1
                forwards += self._extra_forwards(exp, device)
        if self.distill_teacher is not None:
            from fusedrl.rollout.teacher import distill_token_kl

            with timer("logprobs"):
                exp.tok["distill_kl"] = distill_token_kl(exp, model, self.distill_teacher, token_budget=budget,
                                                         device=device, temperature=tau)
                forwards += 2
            self._host["distill_kl"] = exp.completion_view("distill_kl").mean().item()
        with timer("advantages"):
            self._advantages(exp, rollout)
        if not need_old:
            exp.tok.pop("old_logp", None)  # computed only for the KL to the reference
        self._host.update(rollout_metrics(everything, kept, dropped))
        self._host["rollout_tokens"] = float(sum(len(e) for e in exp.examples))
        self._host["forward_tokens"] = forwards * self._host["rollout_tokens"]
        self._host["generated_tokens"] = float(sum(exp.completion_lengths()))
        return exp

    def _extra_forwards(self, exp: Experience, device) -> int:
        """Hook for more rollout-time forwards (PPO's values); returns how many passes it made."""
        return 0

    def _sample_and_score(self, model, timer: Timer):
        """Sample and score P groups; with dynamic sampling keep only groups with distinct rewards."""
        r = self.rollout
        parts, kept_parts, kept, dropped = [], [], 0, 0
        rounds = 1 + (self.opt.resample_rounds if self.opt.dynamic_sampling else 0)
        for _ in range(rounds):
            scored = timer.seconds.get("score", 0.0)
            with timer("generate"):
                # prompts_per_rollout is global: under torch.distributed every rank walks the same stream,
                # samples and scores its share of the prompts (on the gathered policy) and gets all shares
                indices = self.prompts.next(r.prompts_per_rollout)
                sampler = make_sampler(r.backend, model, self.tokenizer, generator=self._sampling_generator(model))
                params = SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                        max_new_tokens=r.max_new_tokens, seed=self.seed)
                part, mine = sample_rollout_divided(sampler, self.tokenizer, self.records, indices, params,
                                                    score=lambda share: self._score(share, timer))
            timer.seconds["generate"] -= timer.seconds.get("score", 0.0) - scored  # the scoring ran inside
            self._host["rollout_prompts_this_rank"] = self._host.get("rollout_prompts_this_rank", 0.0) + mine
            parts.append(part)
            if not self.opt.dynamic_sampling:
                kept_parts.append(part)
                kept += part.num_groups
                break
            constant = constant_groups(part.rewards, r.group_size).tolist()
            keep = [g for g, c in enumerate(constant) if not c][: r.prompts_per_rollout - kept]
            dropped += sum(constant)
            if keep:
                kept_parts.append(part.select_groups(keep))
                kept += len(keep)
            if kept >= r.prompts_per_rollout:
                break
        everything = Rollout.concat(parts)
        if not kept_parts:  # every group was constant: nothing to learn from, but the step must run
            logger.warning("%s: every sampled group had equal rewards; training on the last round as is", self.name)
            kept_parts = [parts[-1]]
        return Rollout.concat(kept_parts), everything, kept, dropped

    def _score(self, part: Rollout, timer: Timer) -> None:
        """Shaped rewards and task accuracy of a rollout (this rank's share under torch.distributed)."""
        r = self.rollout
        with timer("score"):
            raw = self.rewards(part, self.records)
            part.rewards = shape_rewards(raw, [len(c) for c in part.completion_ids], max_new_tokens=r.max_new_tokens,
                                         overlong_cache_len=self.opt.overlong_cache_len).float()
            part.accuracy = self.rewards.accuracy(part, self.records)
            part.token_rewards = self.rewards.token_rewards(part)  # a dense PRM (PPO), else None

    def _sampling_generator(self, model) -> torch.Generator:
        """The sampler's random stream, on the policy's device (multinomial needs them to match)."""
        return sampling_generator(self, model)

    # ------------------------------------------------------------------ advantages

    def _sequence_kl(self, exp: Experience) -> torch.Tensor:
        """(N,) sum over completion tokens of KL_t(old || ref) with the configured estimator."""
        kl = kl_penalty(exp.completion_view("old_logp"), exp.completion_view("ref_logp"), self.opt.kl_kind,
                        clamp=self.opt.kl_clamp)
        return sequence_sums(kl.float(), exp.completion_cu_seqlens(), kl.numel())

    def _advantages(self, exp: Experience, rollout: Rollout) -> None:
        """Sequence advantages, broadcast to the completion tokens as tok["advantages"]."""
        rewards = exp.seq["rewards"]
        if self.opt.beta > 0 and self.opt.kl_in == "reward":
            kl = self._sequence_kl(exp)
            rewards = rewards - self.opt.beta * kl
            self._host["kl_reward"] = kl.mean().item()
        g = self.rollout.group_size
        kind = self.opt.advantage
        if kind is Advantage.GRPO:
            adv = grpo_advantages(rewards, g, eps=self.opt.adv_eps)
        elif kind is Advantage.DR_GRPO:
            adv = dr_grpo_advantages(rewards, g)
        elif kind is Advantage.RLOO:
            adv = rloo_advantages(rewards, g)
        else:  # Advantage.REINFORCE
            adv = self.baseline.advantages(rewards)
        per_token = torch.repeat_interleave(adv.float(), torch.tensor(exp.completion_lengths()))
        if self.distill_teacher is not None:  # dense on-policy distillation reward, per token
            per_token = per_token - self.distill_coef * exp.completion_view("distill_kl")
        if self.opt.whiten:
            per_token = whiten(per_token)
        exp.set_from_completion_view("advantages", per_token)
        exp.seq["advantages"] = adv.float()

    # ------------------------------------------------------------------ the loss

    def _policy_terms(self, model, batch: PackedBatch, totals: StepTotals):
        """(loss, metrics) of the policy part of one micro-batch (additive metrics)."""
        ex = batch.extras
        token_mean = self.opt.aggregation == "token_mean"
        weight, bias = lm_head(model)  # (V, H), (V,) or None
        hidden = hidden_states(model, batch)  # (total, H)
        loss, metrics = linear_policy_loss(
            hidden, weight, batch.labels, ex.get("old_logp"), ex["advantages"], bias=bias,
            temperature=self.rollout.temperature, compute_entropy=True,
            cu_seqlens=batch.cu_seqlens, algo=self.opt.loss_algo,
            eps_low=self.opt.eps_low, eps_high=self.opt.eps_high, dual_clip=self.opt.dual_clip,
            tau_pos=self.opt.tau_pos, tau_neg=self.opt.tau_neg, ref_logp=ex.get("ref_logp"),
            beta=self.opt.beta if self.opt.kl_in == "loss" else 0.0, kl_kind=self.opt.kl_kind,
            kl_clamp=self.opt.kl_clamp, c_ent=self.opt.c_ent,
            sampler_logp=ex["sampler_logp"] if self.opt.tis_cap is not None else None,
            is_cap=self.opt.tis_cap or 2.0, aggregation=self.opt.aggregation, max_len=self.rollout.max_new_tokens,
            num_tokens=totals.tokens if token_mean else None, num_seqs=None if token_mean else totals.sequences)
        share = batch.num_tokens / totals.tokens  # token means over this micro-batch -> additive
        out = {k: v * share for k, v in metrics.items() if k != "response_len"}
        if getattr(self, "_first_pass", False) and ex.get("sampler_logp") is not None:
            out["ratio_ne_1_frac"] = self._ratio_ne_1(hidden, weight, bias, batch, ex["sampler_logp"], totals)
        return loss, out

    def _ratio_ne_1(self, hidden, weight, bias, batch: PackedBatch, sampler_logp, totals: StepTotals):
        """This micro-batch's share of the fraction of trained tokens whose sampler-vs-trainer ratio
        exp(logp - sampler_logp) is not exactly 1 (0 in invariant mode, see docs/numerics.md)."""
        with torch.no_grad():
            logp = linear_logprobs(hidden.detach(), weight, batch.labels, bias=bias,
                                   temperature=self.rollout.temperature)
            trained = batch.labels != -100
            differ = (logp != sampler_logp.to(logp.dtype)) & trained
            return differ.sum().float() / totals.tokens

    def loss(self, model, batch: PackedBatch, totals: StepTotals):
        return self._policy_terms(model, batch, totals)

    # ------------------------------------------------------------------ host side

    def _timing_metrics(self, timer: Timer) -> Dict[str, float]:
        out = {}
        for phase, tokens_key in (("generate", "generated_tokens"), ("score", "rollout_tokens"),
                                  ("logprobs", "forward_tokens")):
            if phase in timer.seconds:
                seconds = timer.seconds[phase]
                out[f"time_{phase}"] = seconds
                out[f"{phase}_tokens_per_s"] = self._host.get(tokens_key, 0.0) / max(seconds, 1e-9)
        if "advantages" in timer.seconds:
            out["time_advantages"] = timer.seconds["advantages"]
        return out

    def host_metrics(self) -> Dict[str, float]:
        out = dict(self._host)
        if self._batches_ready_at is not None:
            seconds = time.perf_counter() - self._batches_ready_at
            out["time_update"] = seconds
            out["update_tokens_per_s"] = self._update_tokens / max(seconds, 1e-9)
        return out

    def evaluate(self, model) -> Dict[str, float]:
        """Greedy completions of up to rollout.eval_prompts held-out prompts: mean reward and accuracy."""
        if not self.eval_records:
            return {}
        n = self.rollout.eval_prompts or len(self.eval_records)
        records = self.eval_records[:n]
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=self.rollout.max_new_tokens)
        rollout = sample_rollout(make_sampler(self.rollout.backend, model, self.tokenizer), self.tokenizer, records,
                                 list(range(len(records))), greedy)
        result = {"reward": self.rewards(rollout, records).mean().item()}
        accuracy = self.rewards.accuracy(rollout, records)
        if accuracy is not None:
            result["accuracy"] = accuracy.mean().item()
        return result

    def state_dict(self) -> dict:
        generator = self.generator.get_state() if self.generator is not None else self._generator_state
        state = {"prompts": self.prompts.state_dict(), "generator": generator,
                 "rollouts_done": self.rollouts_done,
                 "experience": self.exp.state_dict() if self.exp is not None else {}}
        if self.baseline is not None and self.baseline.mean is not None:
            state["baseline"] = {"mean": self.baseline.mean, "count": self.baseline.count}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.generator, self._generator_state = None, state["generator"]
        self.rollouts_done = int(state["rollouts_done"])
        self.exp = Experience.from_state_dict(state["experience"]) if state["experience"] else None
        if "baseline" in state and self.baseline is not None:
            self.baseline.mean, self.baseline.count = state["baseline"]["mean"], state["baseline"]["count"]


# ----------------------------------------------------------------------------- builders


def load_prompt_records(cfg) -> tuple:
    """(train records, eval records or None) of data.train / data.eval; every record needs a prompt."""
    from fusedrl.data.records import load_records

    if not cfg.data.train:
        raise ConfigError.message("data.train", "data.train: the RL stages need a file of prompt records (set data.train)")
    out = []
    for key in ("train", "eval"):
        source = getattr(cfg.data, key)
        records = load_records(source) if source else None
        for i, record in enumerate(records or []):
            if "prompt" not in record and "messages" not in record:
                raise DataError(f"data.{key}: record {i} of {source!r} has no 'prompt' (keys {sorted(record)})")
        out.append(records)
    return out[0], out[1]


def build_policy_gradient_stage(cfg, model, tokenizer, *, algo: Optional[str] = None) -> PolicyGradientStage:
    """The stage of an `RLTrainConfig`: [rollout], [pg] (algo overridden by `algo`), data.train / data.eval."""
    import dataclasses

    from fusedrl.rollout.experience import build_reward_source

    pg = cfg.pg if algo is None else dataclasses.replace(cfg.pg, algo=algo)
    options = resolve_pg_options(pg, cfg.rollout)
    check_rollout(cfg.rollout)
    records, eval_records = load_prompt_records(cfg)
    device = next(model.parameters()).device
    ref = load_reference(cfg.model, pg.ref_model, model) if options.beta > 0 else None
    from fusedrl.rollout.teacher import reward_teacher

    return PolicyGradientStage(records=records, tokenizer=tokenizer, rollout=cfg.rollout, options=options,
                               rewards=build_reward_source(cfg.rollout, device, tokenizer=tokenizer),
                               eval_records=eval_records,
                               ref_model=ref, seed=cfg.run.seed, baseline_decay=pg.baseline_decay, name=pg.algo,
                               distill_teacher=reward_teacher(pg, cfg.model, model), distill_coef=pg.distill_coef)


def _builder(algo: str):
    def build(cfg, model, tokenizer):
        return build_policy_gradient_stage(cfg, model, tokenizer, algo=algo)
    build.__name__ = f"build_{algo}_stage"
    build.__doc__ = f"The {algo} stage (see build_policy_gradient_stage)."
    return build


# run.stage name -> builder, for fusedrl.stages.STAGES
PG_STAGES = {algo: _builder(algo) for algo in ALGORITHMS}
