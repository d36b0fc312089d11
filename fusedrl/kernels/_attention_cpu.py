"""Packed (varlen) attention as a few batched SDPA calls: the CPU path of `varlen_attention`.

The per-document loop of `reference.varlen_attention_reference` makes one
`scaled_dot_product_attention` call (and two `repeat_interleave`s) per document;
a packed micro-batch of short documents spends its time in that Python loop.
Here the documents are grouped by length into buckets, each bucket is gathered
into a padded (B, H, L, D) batch and goes through ONE SDPA call:

- buckets: documents sorted longest first; a bucket keeps taking documents while
  they are at least `RATIO` of its longest (documents up to `SHORT` tokens all
  share one bucket: below that a call costs more than its padding), and while
  B * L^2 stays under `MAX_BUCKET_SCORES` (bounds the mask and any scores);
- padding rows gather a zero row appended to q/k/v; causal attention alone
  keeps real queries off the padded keys (they come after every real key), so
  plain causal buckets use `is_causal=True` and no mask; otherwise a boolean
  (B, 1, L, L) mask holds the window and hides padded keys, and padded queries
  see every key (no fully masked row, so no NaN reaches the backward);
- GQA: `enable_gqa=True`, no repeated k/v.

The outputs of the real tokens are scattered back to packed order with one
index. Autograd flows through the gathers, SDPA and the scatter, so forward and
backward match the per-document loop up to float rounding (tests hold them to it).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

RATIO = 0.5
SHORT = 16
MAX_BUCKET_SCORES = 1 << 24


def length_buckets(lengths: Sequence[int]) -> List[List[int]]:
    """Document ids grouped for batching (empty documents left out), longest bucket first."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    buckets: List[List[int]] = []
    longest = 0
    for i in order:
        n = lengths[i]
        fits = buckets and (n >= RATIO * longest or longest <= SHORT)
        if fits and (len(buckets[-1]) + 1) * longest * longest <= MAX_BUCKET_SCORES:
            buckets[-1].append(i)
        else:
            buckets.append([i])
            longest = n
    return buckets


def _mask(lens: torch.Tensor, width: int, causal: bool, window: Optional[tuple]) -> Optional[torch.Tensor]:
    """(B, 1, L, L) visibility of a padded bucket, or None when is_causal alone is exact."""
    if causal and window is None:
        return None
    pos = torch.arange(width, device=lens.device)
    i, j = pos[:, None], pos[None, :]
    allowed = (j[None] < lens[:, None, None]).expand(lens.shape[0], width, width)
    if causal:
        allowed = allowed & (j <= i)
    if window is not None:
        left, right = window
        if left >= 0:
            allowed = allowed & (j >= i - left)
        if right >= 0:
            allowed = allowed & (j <= i + right)
    allowed = allowed | (i[None] >= lens[:, None, None])  # padded queries see everything
    return allowed[:, None]


def varlen_attention_batched(
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
    """Same contract and results as `varlen_attention_reference`, with one SDPA call per length bucket."""
    total, hq, d = q.shape
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    buckets = length_buckets(lengths)
    if not buckets:
        return q.new_empty(q.shape)
    if len(buckets) == 1 and len(buckets[0]) == 1:  # one document: no gather, no padding
        mask = _mask(torch.tensor([total], device=q.device), total, causal, window)
        return _sdpa(q[None], k[None], v[None], mask, causal and mask is None, scale)[0]
    starts = torch.tensor(bounds[:-1], device=q.device)
    lens_all = torch.tensor(lengths, device=q.device)
    ext = [torch.cat([t, t.new_zeros(1, *t.shape[1:])]) for t in (q, k, v)]
    pieces, token_ids = [], []
    for ids in buckets:
        ids_t = torch.tensor(ids, device=q.device)
        lens, width = lens_all[ids_t], lengths[ids[0]]
        pos = torch.arange(width, device=q.device)
        valid = pos[None, :] < lens[:, None]
        index = torch.where(valid, starts[ids_t, None] + pos[None, :], total)  # (B, L), pads -> zero row
        mask = _mask(lens, width, causal, window)
        flat = index.reshape(-1)
        batch = [t.index_select(0, flat).view(*index.shape, *t.shape[1:]) for t in ext]
        out = _sdpa(*batch, mask, causal and mask is None, scale)  # (B, L, Hq, D)
        pieces.append(out[valid])
        token_ids.append(index[valid])
    inverse = torch.empty(total, dtype=torch.long, device=q.device)
    ids_flat = torch.cat(token_ids)
    inverse[ids_flat] = torch.arange(ids_flat.numel(), device=q.device)
    return torch.cat(pieces).index_select(0, inverse)


def _sdpa(q, k, v, mask, is_causal, scale):
    """(B, L, H, D) in and out; SDPA works on (B, H, L, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
