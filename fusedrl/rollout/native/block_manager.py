"""The paged KV pool's bookkeeping: fixed-size blocks, reference counts, copy-on-write.

Block b holds the K/V of `block_size` consecutive positions of every sequence whose block table
lists it. A group's n samples share the prompt's blocks (`fork` adds references); before a
sequence writes into a block another sequence also references (the prompt's partial last block),
`make_writable` gives it a private copy (the caller copies the K/V pages). A block returns to the
free list when its last reference is dropped.
"""
from __future__ import annotations

from collections import deque
from typing import List, Optional, Tuple

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks = deque(range(num_blocks))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int, write_from: Optional[int] = None) -> int:
        """New blocks `seq` needs to hold num_tokens positions (plus one copy when it writes into a shared block)."""
        grow = max(0, self.blocks_for(num_tokens) - len(seq.block_table))
        return grow + (1 if write_from is not None and self._shared_at(seq, write_from) else 0)

    def _shared_at(self, seq: Sequence, position: int) -> bool:
        index = position // self.block_size
        return index < len(seq.block_table) and self.ref_counts[seq.block_table[index]] > 1

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold num_tokens positions (the caller checked blocks_needed)."""
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._take())

    def make_writable(self, seq: Sequence, position: int) -> Optional[Tuple[int, int]]:
        """Copy-on-write of the block holding `position`: returns (src, dst) pages to copy, or None."""
        if not self._shared_at(seq, position):
            return None
        index = position // self.block_size
        src = seq.block_table[index]
        dst = self._take()
        self.ref_counts[src] -= 1
        seq.block_table[index] = dst
        return src, dst

    def fork(self, child: Sequence) -> None:
        """Count the references of a child that copied its parent's block table."""
        for block in child.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []
        seq.num_cached = 0

    def free_after_shared_prefix(self, seq: Sequence) -> int:
        """Preemption that keeps a sequence's leading blocks still shared with others (its group's prompt,
        held by its siblings): they are full and cached, so a re-prefill starts after them. The other
        blocks are freed. Returns the positions kept (seq.num_cached)."""
        keep = 0
        while (keep < len(seq.block_table) and self.ref_counts[seq.block_table[keep]] > 1
               and (keep + 1) * self.block_size <= seq.num_cached):
            keep += 1
        for block in seq.block_table[keep:]:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        del seq.block_table[keep:]
        seq.num_cached = keep * self.block_size
        return seq.num_cached

    def used_blocks(self) -> List[int]:
        return [b for b, r in enumerate(self.ref_counts) if r > 0]
