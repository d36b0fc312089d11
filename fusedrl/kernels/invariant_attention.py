"""Invariant-mode attention: fixed query tiles and key blocks, the same ops for a token in any layout.

Query tiles of `Q_TILE` rows aligned to absolute positions (the token at position p sits in row
p % Q_TILE), keys in blocks of `KV_BLOCK` from position 0, combined by an online softmax in block
order (`_block_step`); a block after a query's own is fully masked and leaves its state bitwise
unchanged, so prefill, packed training and decode (one query, keys from the paged cache) agree.
`attend_sequence` is the readable one-sequence reference; `attention_plan` + `attend_planned`
(and `attend_sequences`, `invariant_varlen_attention`) run the same per-tile ops for a whole pack
in one batch dimension; on CUDA `attend_planned` runs them as Triton kernels
(`_invariant_attention_triton.py`, same tiles and block order). Why this is invariant, and what is measured vs by construction: the
docstring of `fusedrl.kernels.invariant` and docs/numerics.md.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from ._autocast import autocast_aware

Q_TILE = 32  # query rows per attention tile, aligned to absolute positions
KV_BLOCK = 64  # keys per attention block, from position 0
BMM_CHUNK = 256  # off the CPU: attention's per-block ops run on exactly this many (tile, head) entries
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton path (CUDA) takes
TRITON_MAX_HEAD_DIM = 256
TRITON_MAX_HEAD_DIM_FP32 = 128  # float32 tiles of D = 256 would not fit shared memory (as in attention.py)


def _kv_blocks(keys: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(L, Hkv, D) -> (Hq, ceil(L / KV_BLOCK) * KV_BLOCK, D) in `dtype`, zero keys at the end."""
    length, kv_heads, dim = keys.shape
    padded = max(1, -(-length // KV_BLOCK)) * KV_BLOCK
    out = keys.new_zeros(padded, kv_heads, dim, dtype=dtype)
    out[:length] = keys.to(dtype)
    out = out.transpose(0, 1)  # (Hkv, L', D)
    return out.repeat_interleave(num_heads // kv_heads, dim=0).contiguous()  # query head h reads kv head h // g


def _initial_state(qt: torch.Tensor):
    """Online-softmax state (running max, denominator, accumulator) of query tiles qt (N, Q, D)."""
    n, rows, dim = qt.shape
    return qt.new_full((n, rows), float("-inf")), qt.new_zeros(n, rows), qt.new_zeros(n, rows, dim)


def _block_step(state, qt: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, masked: torch.Tensor, scale: float):
    """Fold one key block into the state: qt (N, Q, D), kb / vb (N, B, D), `masked` broadcast to (N, Q, B).

    The one definition of a block's ops (`attend_sequence` and `attend_planned` both call it), so
    the two agree bitwise. A fully masked block leaves the state bitwise unchanged (alpha = 1, p = 0).
    On the CPU the N entries run as one batch: measured, an entry's bits (bmm, row sums) do not
    depend on N there. Elsewhere a batched GEMM or a reduction may pick its kernel by the batch
    size, so the entries run in chunks of exactly BMM_CHUNK (`_chunked_block_step`): every call has
    one shape, hence one kernel, and an entry never reads another one.
    """
    if qt.device.type == "cpu":
        return _block_rows(state, qt, kb, vb, masked, scale)
    return _chunked_block_step(state, qt, kb, vb, masked, scale)


def _chunked_block_step(state, qt, kb, vb, masked, scale):
    """`_block_rows` over chunks of exactly BMM_CHUNK entries (fully masked zero entries pad the last)."""
    n = qt.shape[0]
    rows = -(-n // BMM_CHUNK) * BMM_CHUNK
    masked = masked.expand(n, qt.shape[1], kb.shape[1])
    parts = [*state, qt, kb, vb, masked]
    if rows != n:  # padding entries: m = -inf, den = acc = 0, every key masked: they stay that way
        fill = [float("-inf"), 0, 0, 0, 0, 0, True]
        parts = [torch.cat([x, x.new_full((rows - n, *x.shape[1:]), f)]) for x, f in zip(parts, fill)]
    outs = [_block_rows(tuple(x[i:i + BMM_CHUNK] for x in parts[:3]),
                        *(x[i:i + BMM_CHUNK] for x in parts[3:]), scale) for i in range(0, rows, BMM_CHUNK)]
    return tuple(torch.cat(col)[:n] for col in zip(*outs))


def _block_rows(state, qt, kb, vb, masked, scale):
    m, den, acc = state
    s = torch.bmm(qt, kb.transpose(1, 2)) * scale  # (N, Q, B)
    s = s.masked_fill(masked, float("-inf"))
    m_new = torch.maximum(m, s.amax(-1))
    # a row with no key yet (m_new = -inf, padding rows only) would give NaN: shift by 0 instead
    shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    alpha = torch.exp(m - shift)
    p = torch.exp(s - shift[..., None])
    den = den * alpha + p.sum(-1)
    acc = acc * alpha[..., None] + torch.bmm(p, vb)
    return m_new, den, acc


def _finish(state) -> torch.Tensor:
    _, den, acc = state
    return acc / den.clamp_min(torch.finfo(acc.dtype).tiny)[..., None]


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
        state = _initial_state(qt)
        for b0 in range(0, min(int(q_pos[-1]) + 1, keys.shape[1]), KV_BLOCK):
            masked = key_pos[b0:b0 + KV_BLOCK][None, None, :] > q_pos[None, :, None]
            state = _block_step(state, qt, keys[:, b0:b0 + KV_BLOCK], values[:, b0:b0 + KV_BLOCK], masked, scale)
        outs.append(_finish(state))
    out = torch.cat(outs, dim=1).transpose(0, 1)  # (rows, Hq, D)
    return out[start - first:start - first + n].to(q.dtype)


def _int_vector(name: str, x, length: Optional[int] = None) -> torch.Tensor:
    t = torch.as_tensor(x).cpu()
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool or (length is not None and len(t) != length):
        want = "a 1-D integer vector" + ("" if length is None else f" of {length} entries")
        raise ValueError(f"{name} must be {want}, got {t.dtype} {tuple(t.shape)}")
    return t.to(torch.int64)


class KernelLayout(NamedTuple):
    """The plan as the Triton kernels read it (`_invariant_attention_triton.py`): int32 on the device.

    A query tile is (sequence, tile index t): the rows at absolute positions [t * Q_TILE, (t+1) * Q_TILE).
    A key block is (sequence, block index b): the keys at positions [b * KV_BLOCK, (b+1) * KV_BLOCK).
    """

    tile_seq: torch.Tensor  # (tiles,) sequence of each query tile, in the plan's batch order
    tile_index: torch.Tensor  # (tiles,) its index t (row 0 at position t * Q_TILE)
    block_seq: torch.Tensor  # (key blocks,) sequence of each key block some query of it sees
    block_index: torch.Tensor  # (key blocks,) its index b
    cu_q: torch.Tensor  # (S + 1,) query row bounds
    cu_k: torch.Tensor  # (S + 1,) key row bounds
    starts: torch.Tensor  # (S,) position of each sequence's first query


class AttentionPlan(NamedTuple):
    """Where every query row and key sits in the tile batch of `attend_planned` (see `attention_plan`)."""

    num_queries: int  # query rows, cu_q[-1]
    num_keys: int  # key rows used, cu_k[-1]
    tiles: int  # (sequence, query tile) pairs, most key blocks first
    active: List[int]  # tiles that have key block b, per b (a prefix of the batch)
    q_index: torch.Tensor  # (tiles * Q_TILE,) query row of each tile row, num_queries for padding
    out_rows: torch.Tensor  # (num_queries,) tile row of each query row
    k_index: torch.Tensor  # (tiles, blocks * KV_BLOCK) key row of each tile's key, num_keys past its sequence
    row_pos: torch.Tensor  # (tiles, Q_TILE) absolute position of each tile row
    kernel: KernelLayout  # the same layout for the Triton path
    key_rows: Optional[torch.Tensor] = None  # (>= num_keys,) int64: key entry j is row key_rows[j] of k / v
    key_rows_end: int = 0  # 1 + the largest row key_rows names (checked against k once per call, no sync)


def attention_plan(cu_q, cu_k, starts, device=None, key_rows: Optional[torch.Tensor] = None) -> AttentionPlan:
    """The tile layout of sequences s: queries rows cu_q[s]:cu_q[s+1] at positions starts[s], ...,
    keys rows cu_k[s]:cu_k[s+1] at positions 0, ... (host ints or int tensors; index tensors on
    `device`). Depends on the lengths only: one plan serves every layer of a forward.

    `key_rows` (optional, an int64 tensor on `device`, e.g. the native engine's paged-cache slots):
    key entry j is row key_rows[j] of the k / v given to `attend_planned` -- the Triton path reads
    those rows in place, the PyTorch path gathers them first; the bits are the same as passing the
    gathered keys. Checked here once (one device sync) rather than in every layer's call.
    """
    cu_q, cu_k = _int_vector("cu_q", cu_q), _int_vector("cu_k", cu_k)
    if len(cu_k) != len(cu_q):
        raise ValueError(f"cu_k must have cu_q's {len(cu_q)} entries, got {len(cu_k)}")
    starts = _int_vector("starts", starts, len(cu_q) - 1)
    n, length = cu_q.diff(), cu_k.diff()
    if len(cu_q) < 1 or cu_q[0] != 0 or bool((n < 0).any()):
        raise ValueError(f"cu_q must rise from 0, got {cu_q.tolist()}")
    if cu_k[0] < 0 or bool((length < 0).any()):
        raise ValueError(f"cu_k must be nondecreasing from >= 0, got {cu_k.tolist()}")
    if bool((starts < 0).any()) or bool((length < starts + n).any()):
        raise ValueError("starts: sequence s needs starts[s] >= 0 and cu_k[s+1] - cu_k[s] >= starts[s] + its "
                         f"query count, got starts {starts.tolist()}, key counts {length.tolist()}")
    nq, nk = int(cu_q[-1]), int(cu_k[-1])
    # tiles: sequence s has count[s] of them from position first[s] (a multiple of Q_TILE) on
    first = starts - starts % Q_TILE
    count = torch.where(n > 0, (starts + n - first + Q_TILE - 1) // Q_TILE, 0)
    seq = torch.repeat_interleave(torch.arange(len(n)), count)  # (T,) a tile's sequence, its tiles ...
    offset = count.cumsum(0) - count
    rank = count[seq] - 1 - (torch.arange(len(seq)) - offset[seq])  # ... last first
    pos0 = first[seq] + rank * Q_TILE  # position of a tile's row 0
    padded_keys = torch.clamp(-(-length // KV_BLOCK), min=1)[seq] * KV_BLOCK
    blocks = -(-torch.minimum(pos0 + Q_TILE, padded_keys) // KV_BLOCK)  # attend_sequence's block count
    order = torch.sort(blocks, descending=True, stable=True).indices
    seq, pos0, blocks = seq[order], pos0[order], blocks[order]
    tiles = len(seq)
    active = [int((blocks > b).sum()) for b in range(int(blocks[0]) if tiles else 0)]
    # query row r -> its tile row; every other tile row reads the zero row nq
    qseq = torch.repeat_interleave(torch.arange(len(n)), n)
    qpos = starts[qseq] + torch.arange(nq) - cu_q[qseq]
    slot_of = torch.empty(tiles, dtype=torch.int64)
    slot_of[order] = torch.arange(tiles)  # tile (sequence order, last first) -> batch index
    tile = slot_of[offset[qseq] + count[qseq] - 1 - (qpos - first[qseq]) // Q_TILE]
    out_rows = tile * Q_TILE + qpos % Q_TILE
    q_index = torch.full((tiles * Q_TILE,), nq, dtype=torch.int64)
    q_index[out_rows] = torch.arange(nq)
    # a tile's key at position p: row cu_k[s] + p, the zero row nk past its sequence's keys
    kpos = torch.arange(len(active) * KV_BLOCK)
    k_index = torch.where(kpos[None] < length[seq][:, None], cu_k[seq][:, None] + kpos[None], nk)
    row_pos = pos0[:, None] + torch.arange(Q_TILE)
    kernel = _kernel_layout(seq, pos0 // Q_TILE, cu_q, cu_k, starts, device)
    rows_end = _check_key_rows(key_rows, nk, device)
    return AttentionPlan(nq, nk, tiles, active, q_index.to(device), out_rows.to(device), k_index.to(device),
                         row_pos.to(device), kernel, key_rows, rows_end)


def _check_key_rows(key_rows: Optional[torch.Tensor], num_keys: int, device) -> int:
    """1 + the largest row `key_rows` names (0 for None); ValueError naming it if it is not an int64
    vector of >= num_keys nonnegative entries on `device`."""
    if key_rows is None:
        return 0
    if not isinstance(key_rows, torch.Tensor) or key_rows.dim() != 1 or key_rows.dtype != torch.int64:
        raise ValueError(f"key_rows must be a 1-D int64 tensor, got {getattr(key_rows, 'dtype', type(key_rows))} "
                         f"{tuple(getattr(key_rows, 'shape', ()))}")
    if key_rows.device.type != torch.device(device or "cpu").type or len(key_rows) < num_keys:
        raise ValueError(f"key_rows must have >= {num_keys} entries on {device or 'cpu'}, got {len(key_rows)} "
                         f"on {key_rows.device}")
    if num_keys == 0:
        return 0
    lo, hi = (int(x) for x in torch.aminmax(key_rows[:num_keys]))
    if lo < 0:
        raise ValueError(f"key_rows must be >= 0, got {lo}")
    return hi + 1


def _kernel_layout(tile_seq, tile_index, cu_q, cu_k, starts, device) -> KernelLayout:
    """`KernelLayout` of a plan: one int32 host tensor, one copy to `device`, views of it.

    Key blocks: every block b of a sequence with queries up to the one holding its last query's
    position (later keys are seen by no query: their gradient stays 0).
    """
    n = cu_q.diff()
    count = torch.where(n > 0, -(-(starts + n) // KV_BLOCK), 0)
    block_seq = torch.repeat_interleave(torch.arange(len(n)), count)
    block_index = torch.arange(len(block_seq)) - (count.cumsum(0) - count)[block_seq]
    parts = [tile_seq, tile_index, block_seq, block_index, cu_q, cu_k, starts]
    flat = torch.cat([x.to(torch.int32) for x in parts]).to(device)
    return KernelLayout(*flat.split([len(x) for x in parts]))


def attend_sequences(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q, cu_k, starts,
                     scale: float) -> torch.Tensor:
    """Many sequences' causal attention at once, each row bitwise `attend_sequence`'s.

    Sequence s: queries q[cu_q[s]:cu_q[s+1]] at positions starts[s], starts[s]+1, ...; keys and
    values k[cu_k[s]:cu_k[s+1]], v[...] at positions 0, 1, ... -- i.e. the result is
    `attend_sequence(q[cu_q[s]:cu_q[s+1]], k[cu_k[s]:cu_k[s+1]], v[...], starts[s], scale)` for every s.
    `attention_plan` + `attend_planned` do the same with the layout computed once for many layers.

    Args:
        q: (Nq, Hq, D); k, v: (Nk, Hkv, D), Hq a multiple of Hkv.
        cu_q: (S + 1,) query row bounds, from 0 to Nq; cu_k: (S + 1,) key row bounds (nondecreasing,
            within Nk); starts: (S,) position of each sequence's first query. Host ints or int tensors.
        scale: softmax scale.
    Returns:
        (Nq, Hq, D) in q's dtype. Differentiable.
    """
    plan = attention_plan(cu_q, cu_k, starts, q.device)
    if plan.num_queries != q.shape[0]:
        raise ValueError(f"cu_q must end at q's {q.shape[0]} rows, got {plan.num_queries}")
    if plan.num_keys > k.shape[0]:
        raise ValueError(f"cu_k must end within k's {k.shape[0]} rows, got {plan.num_keys}")
    return attend_planned(q, k, v, plan, scale)


@autocast_aware("lower", cast=("q", "k", "v"))  # as varlen_attention (and autocast for SDPA)
def attend_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
                   scale: float) -> torch.Tensor:
    """`attend_sequences` on a precomputed `attention_plan` (same arguments otherwise).

    Every (sequence, query tile) of the pack is one entry of a batch dimension (tiles x heads); the
    Python loop runs over the key-block index only, one `torch.bmm` per block for all the tiles that
    still have a block there (`attend_sequence` runs the same `_block_step` on the same per-tile
    shapes, and a bmm entry's bits do not depend on the batch count -- measured on the project's CPU).
    Tiles are ordered by block count, most first, so the tiles active at block b are a prefix of the
    batch; within a sequence that is its last tile first, the order `attend_sequence`'s autograd
    sums a key's gradient over query tiles in (the gathers' backward adds in index order).

    On CUDA (float16 / bfloat16 / float32, head dim within the kernels' limit, unless the backend is
    forced to "reference") the same tiling runs as Triton kernels instead (`_triton_fits`,
    `_invariant_attention_triton.py`): other bits than this path, the same invariance, by construction.
    Under `torch.autocast` q, k, v are cast to the autocast dtype first (as for `varlen_attention`)
    and the op runs with autocast off, so the PyTorch path's float32 math stays float32.
    """
    nq, num_heads, dim = q.shape
    if nq != plan.num_queries:
        raise ValueError(f"q: the plan is for {plan.num_queries} query rows, got {nq}")
    need = plan.num_keys if plan.key_rows is None else plan.key_rows_end
    if k.dim() != 3 or k.shape != v.shape or k.shape[2] != dim or k.shape[0] < need:
        raise ValueError(f"k, v must both be (>= {need}, Hkv, {dim}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if num_heads % k.shape[1]:
        raise ValueError(f"q's {num_heads} heads must be a multiple of k's {k.shape[1]}")
    if nq == 0:
        return q.new_zeros(q.shape)
    if _triton_fits(q):
        return _attend_planned_triton(q, k, v, plan, scale)
    if plan.key_rows is not None:
        k, v = (x.index_select(0, plan.key_rows[:plan.num_keys]) for x in (k, v))
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    tiles = plan.tiles
    qrows = torch.cat([q.to(cdt), q.new_zeros(1, num_heads, dim, dtype=cdt)])
    qt = qrows.index_select(0, plan.q_index).view(tiles, Q_TILE, num_heads, dim).transpose(1, 2)
    qt = qt.contiguous().view(tiles * num_heads, Q_TILE, dim)  # (T * Hq, Q, D), tile-major
    keys = _head_rows(k[:plan.num_keys], num_heads, cdt)  # (Hq, num_keys + 1, D), zero row last
    values = _head_rows(v[:plan.num_keys], num_heads, cdt)
    key_pos = torch.arange(len(plan.active) * KV_BLOCK, device=q.device)
    state = _initial_state(qt)
    done: List[torch.Tensor] = []
    for b, a in enumerate(plan.active):
        rows = a * num_heads
        if rows < state[0].shape[0]:  # tiles past their last block: finished, off the batch
            done.append(_finish(tuple(x[rows:] for x in state)))
            state = tuple(x[:rows] for x in state)
        idx = plan.k_index[:a, b * KV_BLOCK:(b + 1) * KV_BLOCK].reshape(-1)
        kb, vb = (_tile_major(x.index_select(1, idx), a) for x in (keys, values))  # (a * Hq, B, D)
        masked = key_pos[b * KV_BLOCK:(b + 1) * KV_BLOCK][None, None, :] > plan.row_pos[:a, :, None]  # (a, Q, B)
        masked = masked[:, None].expand(a, num_heads, Q_TILE, KV_BLOCK).reshape(rows, Q_TILE, KV_BLOCK)
        state = _block_step(state, qt[:rows], kb, vb, masked, scale)
    done.append(_finish(state))
    out = torch.cat(done[::-1]).view(tiles, num_heads, Q_TILE, dim).transpose(1, 2).reshape(-1, num_heads, dim)
    return out.index_select(0, plan.out_rows).to(q.dtype)


def _triton_fits(q: torch.Tensor) -> bool:
    """Whether `attend_planned` runs the Triton kernels: CUDA q of a kernel dtype and head dim, Triton
    importable, the backend not forced to "reference". The choice depends on the model (dtype, head
    dim, device) only, never on the layout, so every call of a run takes the same path."""
    from ._dispatch import HAS_TRITON, get_backend

    if not (q.is_cuda and HAS_TRITON and get_backend() != "reference"):
        return False
    limit = TRITON_MAX_HEAD_DIM_FP32 if q.dtype == torch.float32 else TRITON_MAX_HEAD_DIM
    return q.dtype in TRITON_DTYPES and q.shape[2] <= limit


def _attend_planned_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
                           scale: float) -> torch.Tensor:
    """`attend_planned` on the Triton kernels, on any device (CPU tensors need TRITON_INTERPRET=1 set
    before Triton is imported; the tests call this directly). ValueError for a dtype or head dim the
    kernels do not take; Triton is imported here, so this module imports without it."""
    from ._invariant_attention_triton import attend_planned_triton

    return attend_planned_triton(q, k, v, plan, scale)


def _head_rows(x: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, Hkv, D) -> (Hq, N + 1, D) in `dtype`, a zero row last; the head expansion of `_kv_blocks`."""
    rows = torch.cat([x.to(dtype), x.new_zeros(1, *x.shape[1:], dtype=dtype)]).transpose(0, 1)
    return rows.repeat_interleave(num_heads // x.shape[1], dim=0).contiguous()


def _tile_major(x: torch.Tensor, tiles: int) -> torch.Tensor:
    """(Hq, tiles * B, D) -> (tiles * Hq, B, D)."""
    heads, _, dim = x.shape
    return x.view(heads, tiles, -1, dim).transpose(0, 1).contiguous().view(tiles * heads, -1, dim)


def invariant_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Causal packed attention, each document as `attend_sequence` from position 0 (`attend_sequences`).

    Args:
        q: (total, Hq, D); k, v: (total, Hkv, D); cu_seqlens: int32 (num_seqs + 1,) boundaries.
    Returns:
        (total, Hq, D) in q's dtype.
    """
    bounds = _int_vector("cu_seqlens", cu_seqlens)
    if not len(bounds) or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must end at total = {q.shape[0]}, got {bounds[-1:].tolist() or 'nothing'}")
    return attend_sequences(q, k, v, bounds, bounds, torch.zeros(len(bounds) - 1, dtype=torch.int64), scale)


def paged_sequence_keys(cache: torch.Tensor, block_table: List[int], length: int) -> torch.Tensor:
    """The first `length` cached rows (L, Hkv, D) of one sequence from a paged cache (pages, bs, Hkv, D)."""
    block_size = cache.shape[1]
    slots = [block_table[p // block_size] * block_size + p % block_size for p in range(length)]
    index = torch.tensor(slots, dtype=torch.int64, device=cache.device)
    return cache.view(-1, *cache.shape[2:]).index_select(0, index)


def paged_slots(block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache rows (sum(lengths),) of positions 0 .. lengths[s]-1 of every sequence s, in order.

    Args:
        block_tables: (S, W) page ids; lengths: (S,) key counts (each <= W * block_size).
    """
    lengths = _int_vector("lengths", lengths, block_tables.shape[0]).to(block_tables.device)
    if bool((lengths > block_tables.shape[1] * block_size).any()):
        raise ValueError(f"lengths: at most {block_tables.shape[1] * block_size} keys fit a block table row, "
                         f"got {lengths.max().item()}")
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    pos = torch.arange(len(seq), device=lengths.device) - (lengths.cumsum(0) - lengths)[seq]
    return block_tables.long()[seq, pos // block_size] * block_size + pos % block_size
