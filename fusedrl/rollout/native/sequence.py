"""One sequence of the native engine: a group's prompt (prefilled once) or one sampled completion.

A prompt sequence (`sample_index is None`) is prefilled once; its last position's logits give the
first token of each of the group's n samples, which are forked from it and share its KV blocks.
`num_cached` tokens have their K/V in the cache; the next step processes tokens[num_cached:] (a
decode step: exactly the last sampled token).
"""
from __future__ import annotations

import enum
import itertools
from typing import List, Optional, Tuple

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # needs (re)prefill: new, partly prefilled, or preempted
    RUNNING = "running"  # decoding
    FINISHED = "finished"


class Sequence:
    __slots__ = ("seq_id", "prompt_index", "sample_index", "token_ids", "num_prompt_tokens", "max_new_tokens",
                 "num_cached", "block_table", "logprobs", "top_logprobs", "status", "finish_reason", "stream")

    def __init__(self, prompt_index: int, token_ids: List[int], max_new_tokens: int,
                 sample_index: Optional[int] = None, stream: int = 0, num_prompt_tokens: Optional[int] = None):
        self.seq_id = next(_ids)
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids) if num_prompt_tokens is None else num_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.num_cached = 0
        self.block_table: List[int] = []
        self.logprobs: List[float] = []
        self.top_logprobs: List[List[Tuple[int, float]]] = []
        self.status = Status.WAITING
        self.finish_reason: Optional[str] = None
        self.stream = stream

    @property
    def is_prompt(self) -> bool:
        return self.sample_index is None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_ids(self) -> List[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def remaining(self) -> int:
        """Tokens this sequence may still sample."""
        return self.max_new_tokens - self.num_completion

    def fork(self, sample_index: int, stream: int) -> "Sequence":
        """A completion of this prompt, sharing its block table (the block manager adds the references)."""
        child = Sequence(self.prompt_index, self.token_ids, self.max_new_tokens, sample_index, stream,
                         self.num_prompt_tokens)
        child.num_cached = self.num_cached
        child.block_table = list(self.block_table)
        return child

    def append(self, token: int, logprob: float, top: Optional[List[Tuple[int, float]]] = None) -> None:
        self.token_ids.append(int(token))
        self.logprobs.append(float(logprob))
        if top is not None:
            self.top_logprobs.append(top)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, prompt={self.prompt_index}, sample={self.sample_index}, "
                f"tokens={self.num_tokens}, cached={self.num_cached}, blocks={len(self.block_table)}, "
                f"{self.status.value})")
