"""Rollouts and experience for the RL stages: sample, score, shape, store per token, pack.

One rollout batch, in order (the stages in `fusedrl.stages.policy_gradient`
and `.ppo` drive it):

    indices = prompts.next(P)                                  # PromptSampler: seeded, resumable
    rollout = sample_rollout(sampler, tokenizer, records, indices, params)   # fusedrl.rollout.completions
    rewards = score_rollout(rollout, records, reward_source)   # verifier or reward model (N,)
    rewards = shape_rewards(...)                               # format + DAPO overlong shaping
    exp = Experience.from_rollout(rollout, rewards)            # per-sequence + per-token storage
    exp.tok["old_logp"] = token_forward(exp, fn=lambda b: token_logprobs(model, b, tau))   # fused kernel, no logits
    batches = exp.pack(indices, token_budget)                  # balanced token-budget micro-batches

Per-token layout. `exp.tok[key][i]` is a float32 tensor aligned with
`exp.examples[i].input_ids`: entry j holds the quantity of *emitting token j*
(its log-prob, its advantage, the value of the state before it), 0 on prompt
tokens. Packing shifts it like the labels, so in a `PackedBatch` position t
(whose label is token t + 1) carries token t + 1's entry, aligned with
`batch.labels`. Samples are ordered prompt-major: sample i belongs to group i // G.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fusedrl.data.batch import IGNORE_INDEX, PackedBatch
from fusedrl.data.packed import Example, pack_balanced
from fusedrl.kernels._ranges import phase_range
from fusedrl.rollout.rewards import load_verifier, reward_model_scores, score_completions

# ----------------------------------------------------------------------------- prompts


class PromptSampler:
    """An endless, seeded, resumable stream of prompt indices: a fresh permutation every epoch.

    Args:
        num_records: prompts available.
        seed: the permutation of epoch e is drawn from a generator seeded by seed + e.
    """

    def __init__(self, num_records: int, seed: int):
        if isinstance(num_records, bool) or not isinstance(num_records, int) or num_records < 1:
            raise ValueError(f"num_records: expected an int >= 1 (prompts to draw from), got {num_records!r}")
        self.num_records, self.seed = num_records, int(seed)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> List[int]:
        return torch.randperm(self.num_records, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def next(self, n: int) -> List[int]:
        """The next n prompt indices, crossing into the next epoch when one ends."""
        out = []
        while len(out) < n:
            if self.position == self.num_records:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_records": self.num_records}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_records") != self.num_records:
            raise ValueError(f"state['num_records']: the checkpoint drew from {state.get('num_records')} prompts, "
                             f"this run has {self.num_records}; resume with the same data")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


# ----------------------------------------------------------------------------- sampling


@dataclass
class Rollout:
    """Completions of one or more rounds of sampling, prompt-major (sample i in group i // group_size).

    prompt_ids/completion_ids: token ids per sample; sampler_logp: the sampler's log-prob of each
    completion token; finished: ended by EOS/stop (not cut by max_new_tokens); record_index: the
    prompt record of each sample; completions: decoded text (special tokens skipped).
    """

    prompt_ids: List[List[int]]
    completion_ids: List[List[int]]
    sampler_logp: List[List[float]]
    finished: List[bool]
    record_index: List[int]
    completions: List[str]
    group_size: int
    rewards: Optional[torch.Tensor] = None  # (N,) float32, after shaping
    accuracy: Optional[torch.Tensor] = None  # (N,) float32 task accuracy when the records carry answers
    token_rewards: Optional[List[torch.Tensor]] = None  # N (completion length,) dense rewards (a PRM under PPO)

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_groups(self) -> int:
        return len(self) // self.group_size

    def select_groups(self, keep: Sequence[int]) -> "Rollout":
        """The rollout restricted to the groups listed in `keep` (in that order)."""
        g = self.group_size
        idx = [k * g + j for k in keep for j in range(g)]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        sel = lambda t: None if t is None else t[torch.tensor(idx, dtype=torch.long)]  # noqa: E731
        return Rollout(pick(self.prompt_ids), pick(self.completion_ids), pick(self.sampler_logp), pick(self.finished),
                       pick(self.record_index), pick(self.completions), g, sel(self.rewards), sel(self.accuracy),
                       None if self.token_rewards is None else pick(self.token_rewards))

    @staticmethod
    def concat(parts: Sequence["Rollout"]) -> "Rollout":
        """The parts one after the other (empty parts, e.g. a rank's empty share, are skipped)."""
        parts = [p for p in parts if len(p)] or list(parts[:1])
        first = parts[0]
        cat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        tcat = lambda name: (None if getattr(first, name) is None  # noqa: E731
                             else torch.cat([getattr(p, name) for p in parts]))
        dense = None if any(p.token_rewards is None for p in parts) else cat("token_rewards")
        return Rollout(cat("prompt_ids"), cat("completion_ids"), cat("sampler_logp"), cat("finished"),
                       cat("record_index"), cat("completions"), first.group_size, tcat("rewards"), tcat("accuracy"),
                       dense)


# ----------------------------------------------------------------------------- rewards


class RewardSource:
    """Scores completions: a verifier `module:function` or a scalar-head reward model, plus optional terms.

    reward = (verifier or reward model, 0 without either) + format_weight * format verifier
             + prm_weight * PRM score (GRPO family: the prm_aggregation of the step scores)
    With `prm_dense` (PPO) the PRM term is not in the sequence reward: `token_rewards(rollout)` gives
    prm_weight * (s_k - prm_baseline) at the token ending step k instead (fusedrl.rollout.prm_reward).

    Args:
        verifier: "module:function" (see `fusedrl.rollout.rewards`), or None.
        reward_model: a `ScalarHeadModel` (already loaded), or None; used when verifier is None.
        token_budget: tokens per packed micro-batch for the reward model's forwards.
        format_verifier, format_weight: optional format check added as weight * score.
        accuracy_verifier: "module:function" giving the task accuracy when records carry `answer`.
        process_scorer: a `ProcessRewardScorer` (frozen PRM + the step separator), or None.
        prm_aggregation: "min", "prod" ("product") or "last"; prm_weight, prm_baseline: see above.
        prm_dense: per-token PRM rewards (PPO) instead of one score per completion.
    """

    def __init__(self, *, verifier: Optional[str] = None, reward_model=None, token_budget: int = 4096,
                 format_verifier: Optional[str] = None, format_weight: float = 1.0,
                 accuracy_verifier: Optional[str] = None, process_scorer=None, prm_aggregation: str = "min",
                 prm_weight: float = 1.0, prm_baseline: float = 0.0, prm_dense: bool = False):
        if verifier is None and reward_model is None and process_scorer is None:
            raise ValueError("rewards: need a verifier ('module:function'), a reward model or a process reward "
                             "model, got none")
        self.verifier = load_verifier(verifier, what="rollout.verifier") if verifier is not None else None
        self.reward_model = reward_model if verifier is None else None
        self.token_budget = token_budget
        self.format_verifier = (load_verifier(format_verifier, what="rollout.format_verifier")
                                if format_verifier is not None else None)
        self.format_weight = float(format_weight)
        self.accuracy_verifier = (load_verifier(accuracy_verifier, what="rollout.accuracy_verifier")
                                  if accuracy_verifier is not None else None)
        how = "prod" if prm_aggregation == "product" else prm_aggregation
        if how not in ("min", "prod", "last"):
            raise ValueError(f"prm_aggregation: expected 'min', 'prod' ('product') or 'last', got {prm_aggregation!r}")
        self.process_scorer, self.prm_aggregation = process_scorer, how
        self.prm_weight, self.prm_baseline, self.prm_dense = float(prm_weight), float(prm_baseline), bool(prm_dense)

    def __call__(self, rollout: Rollout, records: Sequence[dict]) -> torch.Tensor:
        """(N,) float32 rewards (before overlong shaping), on the host."""
        recs = [records[i] for i in rollout.record_index]
        prompts = [str(r.get("prompt", "")) for r in recs]
        if self.verifier is not None:
            rewards = score_completions(self.verifier, prompts, rollout.completions, recs, name="rollout.verifier")
        elif self.reward_model is not None:
            rewards = reward_model_scores(self.reward_model, rollout_examples(rollout), self.token_budget)
        else:
            rewards = torch.zeros(len(rollout), dtype=torch.float32)
        if self.format_verifier is not None:
            rewards = rewards + self.format_weight * score_completions(
                self.format_verifier, prompts, rollout.completions, recs, name="rollout.format_verifier")
        if self.process_scorer is not None and not self.prm_dense:
            rewards = rewards + self.prm_weight * self.process_scorer.outcome(rollout, how=self.prm_aggregation)
        return rewards

    def token_rewards(self, rollout: Rollout) -> Optional[List[torch.Tensor]]:
        """With a dense PRM: N (completion length,) float32 tensors, prm_weight * (s_k - baseline) at step ends."""
        if self.process_scorer is None or not self.prm_dense:
            return None
        return [self.prm_weight * r for r in self.process_scorer.token_rewards(rollout, baseline=self.prm_baseline)]

    def accuracy(self, rollout: Rollout, records: Sequence[dict]) -> Optional[torch.Tensor]:
        """(N,) task accuracy per sample when every record carries an `answer`, else None."""
        recs = [records[i] for i in rollout.record_index]
        if self.accuracy_verifier is None or not all("answer" in r for r in recs):
            return None
        prompts = [str(r.get("prompt", "")) for r in recs]
        return score_completions(self.accuracy_verifier, prompts, rollout.completions, recs,
                                 name="rollout.accuracy_verifier")


def shape_rewards(rewards: torch.Tensor, lengths: Sequence[int], *, max_new_tokens: int,
                  overlong_cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (a no-op when overlong_cache_len is 0), via the kernels' shaping op."""
    if not overlong_cache_len:
        return rewards
    from fusedrl.kernels import overlong_reward_shaping

    return overlong_reward_shaping(rewards, torch.tensor(list(lengths), dtype=torch.float32),
                                   max_len=max_new_tokens, cache_len=min(overlong_cache_len, max_new_tokens))


def constant_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups,) bool: groups whose G rewards are all equal (no learning signal; DAPO drops them)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


# ----------------------------------------------------------------------------- packing


def rollout_examples(rollout: Rollout) -> List[Example]:
    """prompt + completion documents; labels (unshifted) mark the completion tokens only."""
    return [Example(list(p) + list(c), [IGNORE_INDEX] * len(p) + list(c))
            for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]


# ----------------------------------------------------------------------------- experience


@dataclass
class Experience:
    """What the updates of one rollout batch read: per-sequence and per-token tensors (host, float32).

    examples: the documents; prompt_lens: prompt tokens of each; seq: name -> (N,) tensors;
    tok: name -> list of N (len(example),) tensors, token-aligned (see the module docstring).
    """

    examples: List[Example]
    prompt_lens: List[int]
    seq: Dict[str, torch.Tensor] = field(default_factory=dict)
    tok: Dict[str, List[torch.Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @staticmethod
    def from_rollout(rollout: Rollout) -> "Experience":
        exp = Experience(rollout_examples(rollout), [len(p) for p in rollout.prompt_ids])
        exp.tok["sampler_logp"] = [torch.tensor([0.0] * len(p) + list(lp), dtype=torch.float32)
                                   for p, lp in zip(rollout.prompt_ids, rollout.sampler_logp)]
        exp.seq["rewards"] = rollout.rewards.float()
        if rollout.token_rewards is not None:
            exp.tok["dense_rewards"] = [torch.cat([torch.zeros(len(p)), r.float().cpu()])
                                        for p, r in zip(rollout.prompt_ids, rollout.token_rewards)]
        return exp

    def completion_lengths(self) -> List[int]:
        return [len(e) - p for e, p in zip(self.examples, self.prompt_lens)]

    def completion_view(self, key: str) -> torch.Tensor:
        """(sum of completion lengths,) the completion tokens' entries of tok[key], sample after sample."""
        return torch.cat([t[p:] for t, p in zip(self.tok[key], self.prompt_lens)])

    def set_from_completion_view(self, key: str, flat: torch.Tensor) -> None:
        """Inverse of completion_view: write per-completion-token values back (0 on prompt tokens)."""
        out, start = [], 0
        for e, p in zip(self.examples, self.prompt_lens):
            n = len(e) - p
            out.append(torch.cat([torch.zeros(p, dtype=torch.float32), flat[start:start + n].float().cpu()]))
            start += n
        self.tok[key] = out

    def completion_cu_seqlens(self) -> torch.Tensor:
        """(N + 1,) int32 boundaries of the completion view."""
        lengths = torch.tensor(self.completion_lengths(), dtype=torch.int64)
        return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)

    def pack(self, indices: Sequence[int], token_budget: int) -> List[PackedBatch]:
        """Micro-batches of samples `indices` with every seq/tok entry as extras (tok shifted like labels).

        extras["sample_index"] (num_seqs,) int64 names each sequence's sample in this experience.
        """
        examples = [self.examples[i] for i in indices]
        extras = [{**{k: v[i] for k, v in self.seq.items()}, **{k: v[i] for k, v in self.tok.items()},
                   "sample_index": torch.tensor(i)} for i in indices]
        return pack_balanced(examples, token_budget, extras=extras, token_keys=tuple(self.tok))

    def state_dict(self) -> dict:
        """Tensors only (checkpoints load with weights_only=True)."""
        lengths = [len(e) for e in self.examples]
        return {"input_ids": torch.tensor([t for e in self.examples for t in e.input_ids], dtype=torch.int64),
                "lengths": torch.tensor(lengths, dtype=torch.int64),
                "prompt_lens": torch.tensor(self.prompt_lens, dtype=torch.int64),
                "seq": dict(self.seq), "tok": {k: torch.cat(v) for k, v in self.tok.items()}}

    @staticmethod
    def from_state_dict(state: dict) -> "Experience":
        lengths, prompt_lens = state["lengths"].tolist(), state["prompt_lens"].tolist()
        ids = state["input_ids"].split(lengths)
        examples = [Example(x.tolist(), [IGNORE_INDEX] * p + x.tolist()[p:]) for x, p in zip(ids, prompt_lens)]
        tok = {k: list(v.split(lengths)) for k, v in state["tok"].items()}
        return Experience(examples, prompt_lens, dict(state["seq"]), tok)


def token_forward(exp: Experience, fn: Callable[[PackedBatch], torch.Tensor], token_budget: int,
                  device: torch.device) -> List[torch.Tensor]:
    """Run fn over all samples packed by budget; return its per-position output token-aligned per sample.

    Args:
        fn: batch (on `device`) -> (total,) float per position (position t: the label token t + 1).
    Returns:
        N host float32 tensors, entry j = fn's value at position j - 1 (0 at j = 0), 0 on prompt tokens.
    """
    out: List[Optional[torch.Tensor]] = [None] * len(exp)
    with torch.no_grad():
        for batch in pack_balanced(exp.examples, token_budget):
            values = fn(batch.to(device)).detach().float().cpu()  # (total,)
            bounds = batch.cu_seqlens.tolist()
            for k, i in enumerate(batch.extras["example_index"].tolist()):
                s, e = bounds[k], bounds[k + 1]
                row = torch.cat([torch.zeros(1), values[s:e - 1]])
                row[:exp.prompt_lens[i]] = 0.0
                out[i] = row
    return out


class Timer:
    """Accumulates host seconds per phase: `with timer("generate"): ...`."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def __call__(self, phase: str):
        timer = self

        class _Span:  # also a `fusedrl.phase.<phase>` profiler range (fusedrl.kernels._ranges)
            def __enter__(self):
                self.range = phase_range(phase)
                self.range.__enter__()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[phase] = timer.seconds.get(phase, 0.0) + time.perf_counter() - self.start
                self.range.__exit__(*exc)

        return _Span()


def rollout_metrics(rollout: Rollout, kept_groups: int, dropped_groups: int) -> Dict[str, float]:
    """Host metrics of everything sampled in one rollout batch (all rounds)."""
    r = rollout.rewards
    lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
    out = {"reward_mean": r.mean().item(), "reward_std": r.std().item() if r.numel() > 1 else 0.0,
           "response_len": lengths.mean().item(), "unfinished_frac": 1.0 - sum(rollout.finished) / len(rollout),
           "groups_kept": float(kept_groups), "groups_dropped": float(dropped_groups)}
    if rollout.accuracy is not None:
        out["accuracy"] = rollout.accuracy.mean().item()
    if not math.isfinite(out["reward_std"]):
        out["reward_std"] = 0.0
    return out


def build_reward_source(cfg, device, *, tokenizer=None, prm_dense: bool = False) -> RewardSource:
    """The [rollout] table's reward: its verifier, else its reward model, plus its process reward model (frozen).

    Args:
        tokenizer: the policy's tokenizer (needed with rollout.process_reward_model, to find the steps).
        prm_dense: PPO: the PRM gives per-token rewards at step ends instead of one score per completion.
    """
    reward_model = None
    if cfg.verifier is None and cfg.reward_model is not None:
        from fusedrl.models.scalar_head import ScalarHeadModel

        reward_model = ScalarHeadModel.from_pretrained(cfg.reward_model, device=device)
        reward_model.eval().requires_grad_(False)
    scorer = None
    if getattr(cfg, "process_reward_model", None) is not None:
        from fusedrl.rollout.prm_reward import load_process_scorer

        scorer = load_process_scorer(cfg, device, tokenizer)
    return RewardSource(verifier=cfg.verifier, reward_model=reward_model, token_budget=cfg.token_budget,
                        format_verifier=cfg.format_verifier, format_weight=cfg.format_weight,
                        accuracy_verifier=cfg.accuracy_verifier, process_scorer=scorer,
                        prm_aggregation=getattr(cfg, "prm_aggregation", "min"),
                        prm_weight=getattr(cfg, "prm_weight", 1.0), prm_baseline=getattr(cfg, "prm_baseline", 0.0),
                        prm_dense=prm_dense)

