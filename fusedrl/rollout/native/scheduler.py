"""Continuous batching: which sequences run in the next forward, under a token budget.

Each step first schedules every running (decoding) sequence, oldest first, one token each (or a
window of up to `lookahead` tokens when nothing waits for prefill: several decode steps on the
device between host syncs). A sequence that cannot get the blocks it needs preempts the newest
running one (recompute preemption: its blocks are freed and it is prefilled again later, prompt
and completion so far, except the leading prompt blocks its group's other samples still hold: those
stay shared and the re-prefill starts after them). The budget left after decode goes to prefill
chunks of waiting sequences (chunked prefill: a long prompt is split across steps). A group's
prompt is prefilled once; when its last chunk runs, its logits give the first token of each of
the n samples, forked from it with shared blocks. A finished sequence frees its blocks at once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class Chunk:
    """Prefill of seq.token_ids[start:end]; when end == num_tokens it also samples (`samples`)."""

    seq: Sequence
    start: int
    end: int
    samples: List[Sequence] = field(default_factory=list)  # who receives the sampled tokens

    @property
    def completes(self) -> bool:
        return self.end == self.seq.num_tokens


@dataclass
class Batch:
    decode: List[Sequence]
    windows: List[int]  # decode steps per decode sequence (1 unless a multi-step window)
    prefill: List[Chunk]
    copies: List[Tuple[int, int]]  # copy-on-write page copies (src, dst) to do before the forward

    @property
    def steps(self) -> int:
        return max(self.windows, default=1)


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int, lookahead: int,
                 n: int, make_child: Callable[[Sequence, int], Sequence], reuse_prefix: bool = True):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookahead = lookahead
        self.n = n
        self.make_child = make_child
        self.waiting: deque = deque()
        self.running: List[Sequence] = []
        self.finished: List[Sequence] = []
        self.num_preemptions = 0
        self.reuse_prefix = reuse_prefix
        self.num_prefilled = 0  # tokens sent through prefill chunks (prompts once per group, plus re-prefills)
        self.preempted: List[Tuple[int, int]] = []  # per preemption: (tokens of the sequence, positions kept)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def _preempt(self, seq: Sequence) -> None:
        kept = self.blocks.free_after_shared_prefix(seq) if self.reuse_prefix else 0
        if not self.reuse_prefix:
            self.blocks.free(seq)
        self.preempted.append((seq.num_tokens, kept))
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _schedule_decode(self, steps: int, copies) -> Tuple[List[Sequence], List[int]]:
        decode, windows = [], []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            n = min(steps, seq.remaining)
            last = seq.num_tokens - 1  # the position this step writes
            while self.blocks.blocks_needed(seq, last + n, write_from=last) > self.blocks.num_free:
                self._preempt(queue.pop() if queue else seq)
                if seq.status is Status.WAITING:
                    break
            if seq.status is Status.WAITING:
                continue
            copy = self.blocks.make_writable(seq, last)
            if copy is not None:
                copies.append(copy)
            self.blocks.allocate(seq, last + n)
            decode.append(seq)
            windows.append(n)
        return decode, windows

    def _schedule_prefill(self, budget: int, seats: int, copies) -> List[Chunk]:
        chunks: List[Chunk] = []
        for seq in list(self.waiting):
            if budget <= 0:
                break
            want = self.n if seq.is_prompt else 1
            if seats + want > self.max_num_seqs and (seats or chunks):
                break
            end = min(seq.num_tokens, seq.num_cached + budget)
            idle = not self.running and not chunks
            reserve = want if end == seq.num_tokens and not idle else 0  # room for the samples' first blocks
            if self.blocks.blocks_needed(seq, end) + reserve > self.blocks.num_free:
                if not idle:
                    break
                end = min(end, (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size)
                if end <= seq.num_cached:
                    raise RuntimeError(f"the KV pool ({self.blocks.num_blocks} blocks of {self.blocks.block_size}) "
                                       f"cannot hold one sequence of {seq.num_tokens} tokens; raise num_blocks")
            self.blocks.allocate(seq, end)
            chunk = Chunk(seq, seq.num_cached, end)
            if chunk.completes:
                chunk.samples = [self.make_child(seq, j) for j in range(self.n)] if seq.is_prompt else [seq]
            chunks.append(chunk)
            self.num_prefilled += end - seq.num_cached
            budget -= end - seq.num_cached
            seats += want
        return chunks

    def schedule(self) -> Batch:
        """The next step's work; every scheduled sequence has the blocks it writes into."""
        copies: List[Tuple[int, int]] = []
        steps = self.lookahead if not self.waiting else 1
        decode, windows = self._schedule_decode(steps, copies)
        prefill = []
        if all(w == 1 for w in windows):
            budget = self.max_num_batched_tokens - len(decode)
            prefill = self._schedule_prefill(budget, len(self.running), copies)
        if not decode and not prefill and not self.done:
            raise RuntimeError("scheduler: nothing fits in the KV pool; raise num_blocks")
        return Batch(decode, windows, prefill, copies)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.finished.append(seq)

    def _accept(self, seq: Sequence, tokens, check_stop) -> bool:
        """Append sampled (token, logprob, top) triples until a stop; True when seq finished."""
        for token, logprob, top in tokens:
            seq.append(token, logprob, top)
            reason = check_stop(seq)
            if reason is None and seq.remaining == 0:
                reason = "length"
            if reason is not None:
                self._finish(seq, reason)
                return True
        seq.num_cached = seq.num_tokens - 1
        return False

    def postprocess(self, batch: Batch, decode_out, prefill_out, check_stop) -> None:
        """Apply a step's samples: decode_out[i] / prefill_out[c][j] are lists of (token, logprob, top)."""
        for seq, tokens in zip(batch.decode, decode_out):
            if self._accept(seq, tokens, check_stop):
                self.running.remove(seq)
        for chunk, outs in zip(batch.prefill, prefill_out):
            seq = chunk.seq
            seq.num_cached = chunk.end
            if not chunk.completes:
                continue
            self.waiting.remove(seq)
            if seq.is_prompt:
                for child in chunk.samples:
                    self.blocks.fork(child)
                self.blocks.free(seq)
                seq.status = Status.FINISHED
            for child, tokens in zip(chunk.samples, outs):
                child.status = Status.RUNNING
                if not self._accept(child, tokens, check_stop):
                    self.running.append(child)
