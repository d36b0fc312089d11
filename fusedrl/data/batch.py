"""The packed micro-batch every stage feeds the loop.

Tokens of several documents are concatenated into one row; `cu_seqlens` marks
the boundaries explicitly (never inferred from position ids) and position ids
restart at 0 in each document.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One packed micro-batch.

    input_ids:    (total,) int64 tokens of all documents, back to back.
    labels:       (total,) int64 next-token targets aligned with input_ids:
                  labels[t] = input_ids[t + 1] inside a document where that token
                  is trained, IGNORE_INDEX elsewhere (prompt, last token of a document).
    position_ids: (total,) int64, restarting at 0 for every document.
    cu_seqlens:   (num_seqs + 1,) int32 document boundaries.
    max_seqlen:   longest document, a host int.
    num_tokens:   number of trained tokens (labels != IGNORE_INDEX), a host int
                  computed when packing, so the loop needs no device sync.
    extras:       stage-specific per-token or per-sequence tensors (reference
                  log-probs, advantages, pair indices, ...).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_tokens: int
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def total(self) -> int:
        return self.input_ids.numel()

    def to(self, device, non_blocking: bool = True) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return PackedBatch(
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            num_tokens=self.num_tokens,
            extras={k: move(v) for k, v in self.extras.items()},
        )
