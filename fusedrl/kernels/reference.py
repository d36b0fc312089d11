"""Exact PyTorch references for every fused op: the CPU path and the test oracle.

Each function has the signature of its public op and computes in float32
(or float64 when given float64 inputs). They are differentiable through autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def logprobs_from_logits_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Per-token log p(label) (and entropy) of softmax(logits / temperature), exact and chunked.

    logits (..., V) float, labels (...) int32/int64 -> logp (...) [, entropy (...)], float32
    (float64 for float64 logits). Positions with label == ignore_index give 0 and get 0 gradient.
    Tokens are processed in chunks (forward and a recomputing backward), so no float32 copy of
    the whole logits is made; d(logits) comes back in the logits' dtype.
    """
    from ._logprobs_ref import logprobs_from_logits_chunked

    return logprobs_from_logits_chunked(logits, labels, temperature, ignore_index, return_entropy)


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log p(label) (and entropy) of softmax((hidden @ weight.T + bias) / temperature), exact and chunked.

    hidden (..., H), weight (V, H), bias (V,) or None, labels (...) int32/int64 -> logp (...)
    [, entropy (...)], float32 (float64 for float64 inputs). The logits are processed in tiles
    (see `_tiles.tile_shape`) and recomputed in backward, so the (N, V) logits never exist at once.
    """
    from ._logprobs_ref import linear_logprobs_chunked

    return linear_logprobs_chunked(hidden, weight, labels, bias, temperature, ignore_index, return_entropy)


def varlen_attention_reference(
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
    """Packed attention, one document at a time (explicit masks, no kernel tricks).

    q (total, Hq, D), k/v (total, Hkv, D), cu_seqlens int32 (num_seqs + 1,).
    window = (left, right): a query at i sees keys j with i - left <= j <= i + right
    (-1 = unbounded). Returns (total, Hq, D) in q's dtype.
    """
    total, hq, d = q.shape
    hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    pieces = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)  # (Hq, L, D)
        ks = k[start:end].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        length = end - start
        idx = torch.arange(length, device=q.device)
        allowed = torch.ones(length, length, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= idx[None, :] <= idx[:, None]
        if window is not None:
            left, right = window
            if left >= 0:
                allowed &= idx[None, :] >= idx[:, None] - left
            if right >= 0:
                allowed &= idx[None, :] <= idx[:, None] + right
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
        pieces.append(o.transpose(0, 1))
    return torch.cat(pieces, dim=0) if pieces else q.new_empty(q.shape)
