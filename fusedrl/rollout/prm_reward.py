"""A process reward model as the reward of RL: per-step scores of sampled completions.

The policy's completion is split into steps where its decoded text contains the step
separator (the token that completes a separator ends the step; trailing text after the last
separator is a final step ending at the last token). The PRM (same tokenizer as the policy)
reads prompt + completion and scores each step end: s_k = P(good step k) (`step_scores`).
Then, with the math of `fusedrl.kernels.prm`:

    outcome(rollout)        one score per sample: min_k s_k | prod_k s_k | s_K  (GRPO family)
    token_rewards(rollout)  per completion token: s_k - baseline at the token ending step k, 0
                            elsewhere (dense rewards for GAE / PPO)

    scorer = ProcessRewardScorer(ProcessRewardModel.from_pretrained(folder), tokenizer, separator="\\n")
    rewards = scorer.outcome(rollout, how="min")        # (N,)
    dense = scorer.token_rewards(rollout)              # N tensors, one value per completion token

From a config (`[rollout] process_reward_model`, `prm_step_separator`): `load_process_scorer(cfg.rollout,
device, tokenizer)`; `fusedrl.rollout.experience.RewardSource` adds its scores to the reward.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from fusedrl.data.batch import IGNORE_INDEX
from fusedrl.data.packed import Example, pack_balanced
from fusedrl.kernels.prm import SOLUTION_AGGREGATIONS, aggregate_step_scores, step_scores, token_rewards


def completion_step_ends(completion_ids: Sequence[int], tokenizer, separator: str) -> List[int]:
    """Indices into the completion of the tokens that end a step (see the module docstring); [] if empty."""
    if not isinstance(separator, str) or not separator:
        raise ValueError(f"separator: expected a non-empty string, got {separator!r}")
    text, searched, ends = "", 0, []
    for j, token in enumerate(completion_ids):
        text += tokenizer.decode([int(token)], skip_special_tokens=True)
        found = text.find(separator, searched)
        if found >= 0:
            ends.append(j)
            searched = text.rfind(separator) + len(separator)
    if completion_ids and text[searched:].strip():
        ends.append(len(completion_ids) - 1)
    return ends


class ProcessRewardScorer:
    """Scores rollouts with a frozen ProcessRewardModel (see the module docstring).

    Args:
        model: a `fusedrl.models.process_head.ProcessRewardModel` (or anything with `token_logits(batch)`
            and `head_kind`), sharing the policy's tokenizer.
        tokenizer: decodes completion tokens to find the separators.
        separator: the step separator the PRM was trained with.
        token_budget: tokens per packed forward.
    """

    def __init__(self, model, tokenizer, *, separator: str = "\n", token_budget: int = 4096):
        if not hasattr(model, "token_logits"):
            raise TypeError(f"model: expected a ProcessRewardModel (token_logits), got {type(model).__name__}")
        if not isinstance(separator, str) or not separator:
            raise ValueError(f"separator: expected a non-empty string, got {separator!r}")
        self.model, self.tokenizer, self.separator, self.token_budget = model, tokenizer, separator, token_budget

    @torch.no_grad()
    def step_scores(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
                    ) -> List[Tuple[List[int], torch.Tensor]]:
        """Per sample (step-end indices into its completion, (K,) float32 scores of those steps)."""
        device = next(self.model.parameters()).device
        ends = [completion_step_ends(c, self.tokenizer, self.separator) for c in completion_ids]
        examples = [Example(list(p) + list(c), [IGNORE_INDEX] * (len(p) + len(c)))
                    for p, c in zip(prompt_ids, completion_ids)]
        out: List = [None] * len(examples)
        for batch in pack_balanced(examples, self.token_budget):
            scores = step_scores(self.model.token_logits(batch.to(device)), head=self.model.head_kind).float().cpu()
            starts = batch.cu_seqlens[:-1].tolist()
            for start, i in zip(starts, batch.extras["example_index"].tolist()):
                positions = [start + len(prompt_ids[i]) + e for e in ends[i]]
                out[i] = (ends[i], scores[positions] if positions else torch.zeros(0))
        return out

    def outcome(self, rollout, *, how: str = "min", empty: float = 0.0) -> torch.Tensor:
        """(N,) float32: one score per sample, the `how` aggregation of its step scores (`empty` without steps)."""
        if how not in SOLUTION_AGGREGATIONS:
            raise ValueError(f"how: expected one of {SOLUTION_AGGREGATIONS}, got {how!r}")
        per = self.step_scores(rollout.prompt_ids, rollout.completion_ids)
        scores, mask, lengths = _flat_steps(per)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        return aggregate_step_scores(scores, mask, how=how, cu_seqlens=cu, empty=empty).float()

    def token_rewards(self, rollout, *, baseline: float = 0.0) -> List[torch.Tensor]:
        """Per sample a (completion length,) float32 tensor: s_k - baseline at step ends, 0 elsewhere."""
        per = self.step_scores(rollout.prompt_ids, rollout.completion_ids)
        out = []
        for completion, (ends, scores) in zip(rollout.completion_ids, per):
            dense = torch.zeros(len(completion))
            mask = torch.zeros(len(completion), dtype=torch.bool)
            dense[ends], mask[ends] = scores, True
            out.append(token_rewards(dense, mask, baseline=baseline).float())
        return out


def load_process_scorer(cfg, device, tokenizer):
    """A `ProcessRewardScorer` of rollout.process_reward_model (frozen, eval) with rollout.prm_step_separator."""
    from fusedrl.config_io import ConfigError
    from fusedrl.models.process_head import ProcessRewardModel

    if tokenizer is None:
        raise ValueError("tokenizer: rollout.process_reward_model needs the policy's tokenizer to find the steps")
    prm = ProcessRewardModel.from_pretrained(cfg.process_reward_model, device=device)
    prm.eval().requires_grad_(False)
    if len(tokenizer) > prm.config.vocab_size:
        raise ConfigError.message("rollout.process_reward_model", f"rollout.process_reward_model: "
                                  f"{cfg.process_reward_model!r} has a vocabulary of {prm.config.vocab_size} tokens, "
                                  f"the policy's tokenizer {len(tokenizer)}; the PRM must share the policy's tokenizer")
    return ProcessRewardScorer(prm, tokenizer, separator=cfg.prm_step_separator, token_budget=cfg.token_budget)


def _flat_steps(per):
    """Packed (steps of all samples back to back, all-True mask, steps per sample) for the kernels' layout."""
    lengths = [len(ends) for ends, _ in per]
    scores = torch.cat([s for _, s in per]) if any(lengths) else torch.zeros(0)
    return scores.float(), torch.ones(scores.shape, dtype=torch.bool), lengths
