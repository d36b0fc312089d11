"""Invariant mode: a token's numbers do not depend on where, or with whom, it is computed.

    with fusedrl.kernels.invariant():          # or @invariant() on a function, or [numerics] invariant = true
        logp = linear_logprobs(hidden, weight, labels)   # bitwise the same for a token in any layout

Why results move with the layout: a reduction whose order (or kernel) depends on the launch shape.
Measured on the project's CPU (MKL, float32): `x[i:i+M] @ W.T` differs in the last bits from
`(x @ W.T)[i:i+M]` for M in {1, 2, 3, 5, 7} and agrees for M >= 8; batched matmuls behave the same;
row-wise reductions (mean, logsumexp over the last dim) agree for any row count. On GPUs the
split-K / stream-K choice of cuBLAS and the split of a short reduction over several blocks move
with the number of rows too. The invariant path fixes the shape of every reduction a token's
numbers go through:

- rows in fixed tiles: every matmul over tokens runs as calls of exactly `ROW_TILE` rows (the last
  tile padded with zero rows) on a fresh, contiguous buffer -- the same (M, N, K) and alignment for
  every call, so the same kernel and the same per-row reduction order (`invariant_linear`,
  `invariant_rms_norm`; the LM head of `linear_logprobs` in `LM_ROW_TILE`-row tiles, whole
  vocabulary per tile);
- attention per sequence (`attend_sequence`): query tiles of `Q_TILE` rows aligned to absolute
  positions (the token at position p sits in row p % Q_TILE), keys in blocks of `KV_BLOCK` from
  position 0 combined by an online softmax in block order; a block after a query's own is fully
  masked and leaves its state bitwise unchanged, so prefill, packed training and decode (one query,
  keys read from the paged cache) give the same bits;
- the Triton log-prob kernels run with pinned tiles (no autotuning) and a fixed vocabulary chunk.

The flag is a context variable: `invariant()` sets it for the current thread / task, and
`set_invariant()` sets the process default (what `[numerics] invariant = true` does).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F

ROW_TILE = 32  # rows per matmul call (>= 8 agrees with larger M on the measured CPU; 32 fills a GPU tile)
LM_ROW_TILE = 128  # rows per LM-head tile (log-probs): fewer, larger GEMMs over the vocabulary
Q_TILE = 32  # query rows per attention tile, aligned to absolute positions
KV_BLOCK = 64  # keys per attention block, from position 0

_DEFAULT = [False]
_FLAG: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("fusedrl_invariant", default=None)


def is_invariant() -> bool:
    """Whether invariant mode is on here (the innermost `invariant()`, else the process default)."""
    value = _FLAG.get()
    return _DEFAULT[0] if value is None else value


def set_invariant(enabled: bool) -> None:
    """Set the process-wide default (`[numerics] invariant`); `invariant()` still overrides it."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _DEFAULT[0] = enabled


@contextlib.contextmanager
def invariant(enabled: bool = True) -> Iterator[None]:
    """Turn invariant mode on (or off with `enabled=False`) inside the block; also a decorator."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    token = _FLAG.set(enabled)
    try:
        yield
    finally:
        _FLAG.reset(token)


def _padded_rows(x2d: torch.Tensor, tile: int) -> torch.Tensor:
    """A fresh (ceil(n / tile) * tile, K) contiguous copy of x2d, zero rows at the end."""
    n = x2d.shape[0]
    rows = max(1, -(-n // tile)) * tile
    if n == rows:
        return torch.cat([x2d, x2d[:0]])  # a copy even when no padding is needed: same alignment
    return torch.cat([x2d, x2d.new_zeros(rows - n, x2d.shape[1])])


def _check_2d_input(name: str, x: torch.Tensor, width: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"{name} must be a floating tensor of shape (..., {width}), got {x.dtype} "
                         f"{tuple(x.shape)}")


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed in calls of exactly ROW_TILE rows (differentiable).

    Args:
        x: (..., K) activations; weight: (N, K); bias: (N,) or None.
    Returns:
        (..., N), each row bitwise independent of the other rows of `x` and of its index.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    _check_2d_input("x", x, weight.shape[1])
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    n = x2d.shape[0]
    padded = _padded_rows(x2d, ROW_TILE)
    tiles = [F.linear(padded[i:i + ROW_TILE], weight, bias) for i in range(0, padded.shape[0], ROW_TILE)]
    return torch.cat(tiles)[:n].reshape(*lead, weight.shape[0])


def invariant_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm (normalise in float32, cast back, scale) over fixed ROW_TILE-row tiles."""
    _check_2d_input("x", x, weight.shape[-1])
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    padded = _padded_rows(x2d, ROW_TILE)
    tiles = []
    for i in range(0, padded.shape[0], ROW_TILE):
        xf = padded[i:i + ROW_TILE].float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        tiles.append(weight * xf.to(x.dtype))
    return torch.cat(tiles)[: x2d.shape[0]].reshape(*lead, x.shape[-1])


def _kv_blocks(keys: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(L, Hkv, D) -> (Hq, ceil(L / KV_BLOCK) * KV_BLOCK, D) in `dtype`, zero keys at the end."""
    length, kv_heads, dim = keys.shape
    padded = max(1, -(-length // KV_BLOCK)) * KV_BLOCK
    out = keys.new_zeros(padded, kv_heads, dim, dtype=dtype)
    out[:length] = keys.to(dtype)
    out = out.transpose(0, 1)  # (Hkv, L', D)
    return out.repeat_interleave(num_heads // kv_heads, dim=0).contiguous()  # query head h reads kv head h // g


def attend_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of one sequence's queries at positions start .. start+n-1 over keys 0 .. L-1.

    Args:
        q: (n, Hq, D); k, v: (L, Hkv, D) with L >= start + n (the keys of every earlier position);
            Hq a multiple of Hkv. Math in float32 (float64 for float64 inputs).
        start: host int, the absolute position of q's first row.
        scale: softmax scale.
    Returns:
        (n, Hq, D) in q's dtype; each row bitwise the same for any `start` split of the sequence's
        queries and any L >= its own position + 1 (see the module docstring). Differentiable.
    """
    n, num_heads, dim = q.shape
    if k.shape[0] < start + n:
        raise ValueError(f"k: needs at least start + n = {start + n} keys, got {k.shape[0]}")
    if num_heads % k.shape[1]:
        raise ValueError(f"q's {num_heads} heads must be a multiple of k's {k.shape[1]}")
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys, values = _kv_blocks(k, num_heads, cdt), _kv_blocks(v, num_heads, cdt)
    first = start - start % Q_TILE
    last = start + n
    rows = -(-(last - first) // Q_TILE) * Q_TILE
    qpad = q.new_zeros(rows, num_heads, dim, dtype=cdt)
    qpad[start - first:start - first + n] = q.to(cdt)
    qpad = qpad.transpose(0, 1)  # (Hq, rows, D)
    key_pos = torch.arange(keys.shape[1], device=q.device)
    outs: List[torch.Tensor] = []
    for t0 in range(0, rows, Q_TILE):
        q_pos = torch.arange(first + t0, first + t0 + Q_TILE, device=q.device)  # (Q,)
        qt = qpad[:, t0:t0 + Q_TILE].contiguous()  # (Hq, Q, D)
        m = qt.new_full((num_heads, Q_TILE), float("-inf"))
        den = qt.new_zeros(num_heads, Q_TILE)
        acc = qt.new_zeros(num_heads, Q_TILE, dim)
        for b0 in range(0, min(int(q_pos[-1]) + 1, keys.shape[1]), KV_BLOCK):
            kb, vb = keys[:, b0:b0 + KV_BLOCK], values[:, b0:b0 + KV_BLOCK]  # (Hq, B, D)
            s = torch.bmm(qt, kb.transpose(1, 2)) * scale  # (Hq, Q, B)
            s = s.masked_fill(key_pos[b0:b0 + KV_BLOCK][None, None, :] > q_pos[None, :, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            # a row with no key yet (m_new = -inf, padding rows only) would give NaN: shift by 0 instead
            shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            alpha = torch.exp(m - shift)
            p = torch.exp(s - shift[..., None])
            den = den * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.bmm(p, vb)
            m = m_new
        outs.append(acc / den.clamp_min(torch.finfo(cdt).tiny)[..., None])
    out = torch.cat(outs, dim=1).transpose(0, 1)  # (rows, Hq, D)
    return out[start - first:start - first + n].to(q.dtype)


def invariant_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Causal packed attention, each document by `attend_sequence` from position 0.

    Args:
        q: (total, Hq, D); k, v: (total, Hkv, D); cu_seqlens: int32 (num_seqs + 1,) boundaries.
    Returns:
        (total, Hq, D) in q's dtype.
    """
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must end at total = {q.shape[0]}, got {bounds[-1:] or 'nothing'}")
    outs = [attend_sequence(q[a:b], k[a:b], v[a:b], 0, scale) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def paged_sequence_keys(cache: torch.Tensor, block_table: List[int], length: int) -> torch.Tensor:
    """The first `length` cached rows (L, Hkv, D) of one sequence from a paged cache (pages, bs, Hkv, D)."""
    block_size = cache.shape[1]
    slots = [block_table[p // block_size] * block_size + p % block_size for p in range(length)]
    index = torch.tensor(slots, dtype=torch.int64, device=cache.device)
    return cache.view(-1, *cache.shape[2:]).index_select(0, index)
