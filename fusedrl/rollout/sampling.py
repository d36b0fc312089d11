"""The one sampling interface every rollout backend implements.

    params = SamplingParams(n=8, temperature=1.0, top_p=0.95, max_new_tokens=256, seed=0)
    groups = sampler.generate(prompts, params)     # prompts: list of token-id lists
    groups[i][j].token_ids      # j-th completion of prompt i (no prompt tokens), ends with the stop token if any
    groups[i][j].logprobs       # per token: log softmax(logits / temperature)[token] over the FULL vocabulary,
                                # before top-k / top-p / min-p truncation (what the trainer recomputes)
    groups[i][j].finish_reason  # "stop" (a stop token or stop string) or "length" (max_new_tokens)

Around the training phase a backend may release its KV memory (`sleep()`) and
take it back (`wake()`). `sync_weights()` makes the trainer's latest weights
visible to the sampler; it is a no-op for backends that read the trainer's
parameters in place (the native engine, the hf backend).

Reproducibility: a completion is a function of its prompt, the weights, the
params and (seed, first_index + prompt index, sample index): what else shares the batch does
not change it (up to floating-point reduction order).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Validated on construction (ValueError naming the field).

    n: completions per prompt (a group shares the prompt's KV blocks in the native engine).
    temperature: logits are divided by it; 0 means greedy (argmax), log-probs then at temperature 1.
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass (1.0 = off).
    min_p: drop tokens whose probability is below min_p * max probability (0.0 = off).
    max_new_tokens: completion length cap. stop_token_ids: tokens that end a completion (kept in it).
    stop_strings: decoded substrings that end a completion (needs a tokenizer in the backend).
    seed: base seed; completion j of prompt i draws from a stream seeded by (seed, i, j).
    logprobs_topk: also return the top-k log-probs per position (0 = off).
    first_index: the global index of the first prompt of the call: prompt i of the call is prompt
        first_index + i of the seed's stream, so sampling prompts [k, n) with first_index=k gives the
        completions that sampling [0, n) gives them (how ranks divide a rollout).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 64
    stop_token_ids: Tuple[int, ...] = ()
    stop_strings: Tuple[str, ...] = ()
    seed: int = 0
    logprobs_topk: int = 0
    first_index: int = 0

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            bad("temperature", "a finite float >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an int >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", "in (0, 1]")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p < 1.0:
            bad("min_p", "in [0, 1)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an int >= 1")
        if not isinstance(self.seed, int):
            bad("seed", "an int")
        if not isinstance(self.logprobs_topk, int) or self.logprobs_topk < 0:
            bad("logprobs_topk", "an int >= 0")
        if isinstance(self.first_index, bool) or not isinstance(self.first_index, int) or self.first_index < 0:
            bad("first_index", "an int >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "non-negative token ids")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad("stop_strings", "non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled completion: token ids (no prompt), the log-prob of each, why it ended.

    top_logprobs: when params.logprobs_topk > 0, per position a list of (token_id, logprob) pairs.
    """

    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None

    def __post_init__(self):
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"Completion: {len(self.token_ids)} token_ids but {len(self.logprobs)} logprobs")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Completion.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


class Sampler(abc.ABC):
    """A rollout backend. `generate` is the only required method."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> List[List[Completion]]:
        """Sample params.n completions of each prompt; returns one list of n Completions per prompt."""

    def sleep(self) -> None:
        """Release the KV-cache memory before the training phase (no-op by default)."""

    def wake(self) -> None:
        """Re-take the KV-cache memory after the training phase (no-op by default)."""

    def sync_weights(self) -> None:
        """Make the trainer's latest weights visible (no-op for backends reading them in place)."""


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: Optional[int] = None) -> List[List[int]]:
    """Validate prompts as non-empty lists of token ids (< vocab_size when given); returns plain lists."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompts[{i}] is empty")
        if min(ids) < 0 or (vocab_size is not None and max(ids) >= vocab_size):
            raise ValueError(f"prompts[{i}] has a token id outside [0, {vocab_size}): {min(ids)}..{max(ids)}")
        out.append(ids)
    return out
