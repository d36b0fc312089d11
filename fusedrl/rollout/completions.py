"""Completions through the one Sampler interface: RL rollouts, N samples per prompt, greedy evaluation.

    sampler = make_sampler("native", model, tokenizer, generator=g)   # [rollout] backend (rollout/backends.py)
    rollout = sample_rollout(sampler, tokenizer, records, indices, SamplingParams(n=G, ...))   # RL
    texts = sample_texts(sampler, tokenizer, records, SamplingParams(n=8, ...))   # (M, N) strings: rejection
    texts = greedy_texts(model, tokenizer, records, max_new_tokens=12)           # greedy eval, the demo's score

Every stage samples through these three functions, so a new backend (native, vLLM) plugs in
at `make_sampler` only.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from fusedrl.data.records import tokenize_prompt
from fusedrl.rollout.backends import AVAILABLE_BACKENDS, BACKENDS, DEFAULT_BACKEND, make_sampler  # noqa: F401
from fusedrl.rollout.experience import Rollout
from fusedrl.rollout.sampling import Sampler, SamplingParams

def _prompts(records: Sequence[dict], tokenizer) -> List[List[int]]:
    return [tokenize_prompt(r, tokenizer) for r in records]


def sample_rollout(sampler: Sampler, tokenizer, records: Sequence[dict], indices: Sequence[int],
                   params: SamplingParams) -> Rollout:
    """params.n completions of each prompt record `records[i]`, i in `indices`, as a Rollout.

    Returns:
        A Rollout of len(indices) * n samples, prompt-major, with the sampler's log-probs at
        params.temperature over the full vocabulary.
    """
    prompts = _prompts([records[i] for i in indices], tokenizer)
    groups = sampler.generate(prompts, params)
    flat = [c for group in groups for c in group]
    return Rollout(prompt_ids=[p for p in prompts for _ in range(params.n)],
                   completion_ids=[c.token_ids for c in flat], sampler_logp=[c.logprobs for c in flat],
                   finished=[c.finish_reason == "stop" for c in flat],
                   record_index=[i for i in indices for _ in range(params.n)],
                   completions=[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in flat],
                   group_size=params.n)


def sample_texts(sampler: Sampler, tokenizer, records: Sequence[dict], params: SamplingParams) -> List[List[str]]:
    """params.n completions per record's prompt, decoded (special tokens skipped): (M, N) nested lists."""
    groups = sampler.generate(_prompts([{"prompt": r["prompt"]} for r in records], tokenizer), params)
    return [[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group] for group in groups]


@torch.no_grad()
def greedy_texts(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int, batch_size: int = 64,
                 backend: str = DEFAULT_BACKEND) -> List[str]:
    """The greedy completion of each record's prompt, decoded (special tokens skipped)."""
    sampler = make_sampler(backend, model, tokenizer, batch_size=batch_size)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    return [group[0] for group in sample_texts(sampler, tokenizer, records, params)]
