"""Packed-sequence (varlen) attention. Public op: `varlen_attention`.

The Triton kernel is being built (issue 5); until then the reference runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import varlen_attention_reference


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[tuple] = None,
) -> torch.Tensor:
    """Attention over packed documents: q (total, Hq, D), k/v (total, Hkv, D)."""
    return varlen_attention_reference(
        q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale, window=window
    )
