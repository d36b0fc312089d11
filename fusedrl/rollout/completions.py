"""Completions through the one Sampler interface: RL rollouts, N samples per prompt, greedy evaluation.

    sampler = make_sampler("native", model, tokenizer, generator=g)   # [rollout] backend (rollout/backends.py)
    rollout = sample_rollout(sampler, tokenizer, records, indices, SamplingParams(n=G, ...))   # RL
    rollout, mine = sample_rollout_divided(sampler, tokenizer, records, indices, params, score)  # RL, torchrun
    texts = sample_texts(sampler, tokenizer, records, SamplingParams(n=8, ...))   # (M, N) strings: rejection
    texts = greedy_texts(model, tokenizer, records, max_new_tokens=12)           # greedy eval, the demo's score

Every stage samples through these three functions, so a new backend (native, vLLM) plugs in
at `make_sampler` only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

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


def rank_prompts(num_prompts: int, rank: int, world: int) -> Tuple[int, int]:
    """[lo, hi): the contiguous share of a rollout's prompts that `rank` of `world` samples.

    Equal to within one prompt; the first ranks take the larger shares. A prompt's whole group
    (params.n samples) stays on its rank.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world = {world}, got {rank}")
    base, extra = divmod(num_prompts, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def sample_rollout_divided(sampler: Sampler, tokenizer, records: Sequence[dict], indices: Sequence[int],
                           params: SamplingParams, score: Optional[Callable[[Rollout], None]] = None
                           ) -> Tuple[Rollout, int]:
    """`sample_rollout` divided across the ranks of a process group; every rank gets the global rollout.

    Rank r samples its share `rank_prompts(len(indices), r, world)` of the prompts, with
    params.first_index moved to the share's first prompt (the native engine then gives the
    completions one process gives them), runs `score(part)` on it (sets part.rewards /
    part.accuracy), and `all_gather_object` gives every rank all shares in rank order. Without a
    process group (or at world size 1) it is `sample_rollout` then `score`.

    Returns:
        (the global rollout, how many prompts this rank sampled).
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    lo, hi = (0, len(indices)) if world == 1 else rank_prompts(len(indices), dist.get_rank(), world)
    part = sample_rollout(sampler, tokenizer, records, list(indices)[lo:hi],
                          dataclasses.replace(params, first_index=params.first_index + lo))
    if score is not None and len(part):
        score(part)
    if world == 1:
        return part, hi - lo
    device = next((t.device for t in (part.rewards, part.accuracy) if t is not None), torch.device("cpu"))
    host = lambda t: None if t is None else t.cpu()  # noqa: E731  (pickled CUDA tensors name a device)
    parts: List[Optional[Rollout]] = [None] * world
    dense = None if part.token_rewards is None else [host(t) for t in part.token_rewards]  # a dense PRM (PPO)
    dist.all_gather_object(parts, dataclasses.replace(part, rewards=host(part.rewards), accuracy=host(part.accuracy),
                                                      token_rewards=dense))
    out = Rollout.concat(parts)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    dense = None if out.token_rewards is None else [move(t) for t in out.token_rewards]
    return dataclasses.replace(out, rewards=move(out.rewards), accuracy=move(out.accuracy), token_rewards=dense), hi - lo


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
