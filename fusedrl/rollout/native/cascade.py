"""Cascade decode attention on the CPU: a group's shared prompt pages are attended once per group.

The n samples of a group share their prompt's full KV pages. Per-row paged attention gathers those
pages n times and runs n x (kv heads) tiny products (4 query rows per kv head for GQA 4). Here a
decode step's attention is split in two and merged exactly (log-sum-exp):

- prefix: for each group, the queries of all its decoding samples (n x group query heads per kv
  head) against the shared pages, gathered once: one batched matrix product per (group, kv head);
- suffix: each row against its own pages after the prefix (the partial prompt page copy and the
  completion so far), as in the per-row path.

`out = (e^(m_p - m) O_p + e^(m_s - m) O_s) / (e^(m_p - m) l_p + e^(m_s - m) l_s)` with m the larger
of the two running maxima: the same softmax over the same keys, in float32 (float64 for float64
inputs), up to reduction order. `plan_cascade` builds the inputs from the host-side block tables;
it returns None when no two decoding rows share a page (then the per-row path runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class CascadeInputs:
    """members (G, Gm) int64: decode rows of each group (padded with B, a dummy row); prefix_pages (G, Pm)
    int64: the group's shared pages (padded with page 0); prefix_lens (G,) int64 keys in them;
    row_prefix (B,) int64: prefix keys of each row (0 outside groups); suffix_tables (B, Ws) int64: each
    row's pages after its prefix (padded with page 0)."""

    members: torch.Tensor
    prefix_pages: torch.Tensor
    prefix_lens: torch.Tensor
    row_prefix: torch.Tensor
    suffix_tables: torch.Tensor


def plan_cascade(tables: Sequence[List[int]], groups: Sequence[int], prompt_pages: Sequence[int],
                 block_size: int, device) -> Optional[CascadeInputs]:
    """Group decode rows by `groups[b]` (their prompt); a group's prefix is the longest run of leading pages
    all its rows share, at most `prompt_pages[b]` (full prompt pages). None when nothing is shared."""
    by_group = {}
    for b, g in enumerate(groups):
        by_group.setdefault(g, []).append(b)
    plans = []
    for rows in by_group.values():
        if len(rows) < 2:
            continue
        first = tables[rows[0]]
        limit = min(min(prompt_pages[b] for b in rows), min(len(tables[b]) for b in rows))
        shared = 0
        while shared < limit and all(tables[b][shared] == first[shared] for b in rows):
            shared += 1
        if shared:
            plans.append((rows, first[:shared]))
    if not plans:
        return None
    batch = len(tables)
    width = max(len(r) for r, _ in plans)
    pages = max(len(p) for _, p in plans)
    members = [r + [batch] * (width - len(r)) for r, _ in plans]
    prefix_pages = [p + [0] * (pages - len(p)) for _, p in plans]
    row_pages = [0] * batch
    for rows, p in plans:
        for b in rows:
            row_pages[b] = len(p)
    suffix = [list(tables[b][row_pages[b]:]) for b in range(batch)]
    suffix_width = max(1, max(len(s) for s in suffix))
    suffix = [s + [0] * (suffix_width - len(s)) for s in suffix]

    def t(x):
        return torch.tensor(x, dtype=torch.int64, device=device)
    return CascadeInputs(members=t(members), prefix_pages=t(prefix_pages),
                         prefix_lens=t([len(p) * block_size for _, p in plans]),
                         row_prefix=t([n * block_size for n in row_pages]), suffix_tables=t(suffix))


def _partial(q, keys, values, valid, scale):
    """Softmax pieces of q (..., M, D) over keys / values (..., N, D) with valid (..., 1 or M, N):
    running max m (..., M), sum l (..., M) and unnormalised output o (..., M, D)."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale).masked_fill_(~valid, float("-inf"))
    m = scores.amax(dim=-1)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m_safe[..., None])
    return m, p.sum(dim=-1), torch.matmul(p, values)


def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: CascadeInputs,
                             context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, Hq, D) attention of one decode token per row over its paged keys (context_lens[b] of them),
    the group-shared prefix pages attended once per group (see the module docstring)."""
    batch, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    group = num_heads // num_kv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qa = q.to(acc)
    # prefix: (G, Hkv, Gm * group, D) queries against (G, Hkv, Lp, D) keys
    num_groups, width = plan.members.shape
    q_pad = torch.cat([qa, qa.new_zeros(1, num_heads, head_dim)])
    qp = q_pad.index_select(0, plan.members.reshape(-1)).view(num_groups, width, num_kv, group, head_dim)
    qp = qp.permute(0, 2, 1, 3, 4).reshape(num_groups, num_kv, width * group, head_dim)
    pages = plan.prefix_pages.reshape(-1)
    kp = k_cache.index_select(0, pages).view(num_groups, -1, num_kv, head_dim).to(acc).transpose(1, 2)
    vp = v_cache.index_select(0, pages).view(num_groups, -1, num_kv, head_dim).to(acc).transpose(1, 2)
    valid = (torch.arange(kp.shape[2], device=q.device)[None, :] < plan.prefix_lens[:, None])[:, None, None, :]
    m_p, l_p, o_p = _partial(qp, kp, vp, valid, scale)
    # back to rows: (G, Hkv, Gm, group) -> (G * Gm, Hq), scattered into B + 1 rows (the last is padding)
    def to_rows(x, fill):
        x = x.view(num_groups, num_kv, width, group, *x.shape[3:]).transpose(1, 2)
        x = x.reshape(num_groups * width, num_heads, *x.shape[4:])
        out = x.new_full((batch + 1, num_heads, *x.shape[2:]), fill)
        return out.index_copy_(0, plan.members.reshape(-1), x)[:batch]
    m_p, l_p, o_p = to_rows(m_p, float("-inf")), to_rows(l_p, 0.0), to_rows(o_p, 0.0)
    # suffix: each row's own pages, (B, Hkv, group, D) against (B, Hkv, Ls, D)
    spages = plan.suffix_tables.reshape(-1)
    ks = k_cache.index_select(0, spages).view(batch, -1, num_kv, head_dim).to(acc).transpose(1, 2)
    vs = v_cache.index_select(0, spages).view(batch, -1, num_kv, head_dim).to(acc).transpose(1, 2)
    suffix_len = context_lens.long() - plan.row_prefix
    valid = (torch.arange(ks.shape[2], device=q.device)[None, :] < suffix_len[:, None])[:, None, None, :]
    m_s, l_s, o_s = _partial(qa.view(batch, num_kv, group, head_dim), ks, vs, valid, scale)
    m_s, l_s, o_s = m_s.reshape(batch, num_heads), l_s.reshape(batch, num_heads), o_s.reshape(batch, num_heads, -1)
    m = torch.maximum(m_p, m_s)
    a_p = torch.exp(m_p - m)  # exp(-inf) = 0 for rows without a prefix
    a_s = torch.exp(m_s - m)
    out = (o_p * a_p[..., None] + o_s * a_s[..., None]) / (l_p * a_p + l_s * a_s)[..., None]
    return out.to(q.dtype)
