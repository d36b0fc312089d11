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

- rows in fixed tiles: every matmul over tokens runs in tiles of exactly `ROW_TILE` rows (the last
  tile padded with zero rows) of a fresh, contiguous buffer -- the same (M, N, K) and alignment for
  every tile, so the same kernel and the same per-row reduction order (`invariant_linear`: on the
  CPU the entries of one batched matmul, measured bitwise equal to a call per tile for any tile
  count; `invariant_rms_norm`: row-wise ops on the padded rows; the LM head of `linear_logprobs` in
  calls of up to `LM_ROW_TILE` rows, whole vocabulary per call, rows padded to `ROW_TILE` on the CPU
  -- measured, a row's bits are the same in calls of 32, 64, 96 or 128 rows there -- and to whole
  `LM_ROW_TILE` calls elsewhere);
- one batch-invariant GEMM on CUDA: for float16 / bfloat16 / float32 `invariant_linear` runs a Triton
  kernel (`_invariant_matmul_triton.py`) in one launch for all rows instead of a call per tile,
  invariant by construction: one program per output tile computes each output element completely
  (no split-K / stream-K / atomics), over K in fixed BLOCK_K steps ascending with float32
  accumulation, tiles / warps / stages fixed per dtype (no autotuning, M not specialised), so the
  number of rows only changes how many programs run; dx = dy @ W runs on the same kernel (dW, dbias
  are sums over tokens, plain torch). Its bits are not `F.linear`'s, but the path is chosen by device
  and dtype only. Checked under TRITON_INTERPRET=1 on the CPU and compiled ahead of time for sm_90 /
  sm_80; its CUDA bitwise tests (`gpu`) and its speed are still to be run on a GPU (the per-tile
  `F.linear` loop remains the CUDA fallback without Triton or with the backend forced to "reference");
  RMSNorm likewise runs a Triton kernel on CUDA (`_invariant_norm_triton.py`: one program per row, a
  reduction order fixed by the width), instead of the NORM_CHUNK loop, also pending a GPU run;
- attention per sequence (`invariant_attention.py`: `attend_sequence`): query tiles of `Q_TILE` rows aligned to absolute
  positions (the token at position p sits in row p % Q_TILE), keys in blocks of `KV_BLOCK` from
  position 0 combined by an online softmax in block order; a block after a query's own is fully
  masked and leaves its state bitwise unchanged, so prefill, packed training and decode (one query,
  keys read from the paged cache) give the same bits. `attend_sequence` is the readable one-sequence
  reference; `attend_sequences` / `attend_planned` (packed training, prefill, batched decode) run
  the same per-tile ops with every (sequence, query tile) of a pack in one batch dimension and a
  Python loop over the key-block index only (a tile leaves the batch after its last block) --
  measured on the CPU: an entry of `torch.bmm` has the same bits whatever the batch count (1..100
  entries, Q 32, B 64, D 32 / 64, float32 / float64), so the two agree bitwise, gradients included;
  off the CPU, where a batched GEMM or a reduction may pick its kernel by the batch size, each
  block's ops run on chunks of exactly `BMM_CHUNK` entries (`_chunked_block_step`);
  on CUDA (float16 / bfloat16 / float32, head dim <= 256, <= 128 in float32) `attend_planned` runs
  Triton kernels instead (`_invariant_attention_triton.py`), invariant by construction rather than
  by measurement: one program per (query tile, head) with the same fixed tiles (32 query rows at
  absolute positions x 64 keys from position 0, no autotuning, warps / stages fixed per head dim and
  dtype), the key blocks in ascending order up to a bound set by the tile and the key count only (so
  decode and training run a row through the same instructions; later blocks are fully masked no-ops),
  and a deterministic FA2 backward (dk / dv per key block of one sequence, summed over the GQA group's
  heads and the query tiles in a fixed order, no atomics). Its bits are not the PyTorch path's, but
  one run uses one path. Checked under TRITON_INTERPRET=1 on the CPU; its CUDA bitwise tests (`gpu`)
  and its speed are still to be run on a GPU;
- the Triton log-prob kernels run with pinned tiles (no autotuning) and a fixed vocabulary chunk.

The flag is a context variable: `invariant()` sets it for the current thread / task, and
`set_invariant()` sets the process default (what `[numerics] invariant = true` does).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ._autocast import autocast_aware

ROW_TILE = 32  # rows per matmul call (>= 8 agrees with larger M on the measured CPU; 32 fills a GPU tile)
LM_ROW_TILE = 128  # rows per LM-head call (log-probs: ROW_TILE-row tiles, a few per call; memory bound)
NORM_CHUNK = 1024  # off the CPU: RMSNorm rows per call (a multiple of ROW_TILE)
TRITON_LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the Triton matmul / RMSNorm (CUDA) take
TRITON_NORM_MAX_WIDTH = 32768  # widest row the Triton RMSNorm holds in one block (wider: the chunked torch path)

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


@autocast_aware("lower", cast=("x", "weight", "bias"))  # as autocast does for F.linear
def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed in calls of exactly ROW_TILE rows (differentiable).

    On the CPU the tiles are the entries of one `torch.bmm` / `torch.baddbmm` over the weight expanded
    to every tile: measured bitwise equal to one `F.linear` per tile (1..200 tiles, bias inside the
    product as `F.linear` has it; the gradient w.r.t. x too), whatever the tile count. The weight's
    gradient sums the tiles in the expand's reduction order instead of autograd's tile-by-tile one
    (a sum over every token: no per-token property to keep). On CUDA (`_triton_linear_fits`) the
    batch-invariant Triton kernel instead, one launch for all rows, no padding (other bits than
    `F.linear`, the same invariance, by construction). Elsewhere one `F.linear` per tile, as batched
    GEMMs may pick their kernel (split-K) by the batch count there.

    Args:
        x: (..., K) activations; weight: (N, K); bias: (N,) or None.
    Returns:
        (..., N), each row bitwise independent of the other rows of `x` and of its index.

    Under `torch.autocast` x, weight and bias are cast to the autocast dtype first (what autocast
    does for `F.linear`) and the op runs with autocast off: the CPU batched path, the CUDA kernel and
    the per-tile fallback all see that one dtype (the casts are differentiable).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    _check_2d_input("x", x, weight.shape[1])
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if _triton_linear_fits(x2d, weight):
        return _invariant_linear_triton(x2d, weight, bias).reshape(*lead, weight.shape[0])
    out = _tile_linear(_padded_rows(x2d, ROW_TILE), weight, bias)
    return out[:x2d.shape[0]].reshape(*lead, weight.shape[0])


def _triton_linear_fits(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `invariant_linear` runs the Triton kernel: CUDA x and weight of one kernel dtype, Triton
    importable, the backend not forced to "reference". The choice depends on the model (dtype,
    device) only, never on the rows, so every call of a run takes the same path."""
    from ._dispatch import HAS_TRITON, get_backend

    if not (x2d.is_cuda and weight.is_cuda and HAS_TRITON and get_backend() != "reference"):
        return False
    return x2d.dtype in TRITON_LINEAR_DTYPES and weight.dtype == x2d.dtype


def _invariant_linear_triton(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                             ) -> torch.Tensor:
    """`F.linear` of (M, K) rows on the batch-invariant Triton kernel, one launch for all rows, on any
    device (CPU tensors need TRITON_INTERPRET=1 set before Triton is imported; the tests call this
    directly). ValueError naming the argument for inputs it does not take. Triton is imported here, so
    this module imports without it."""
    from ._invariant_matmul_triton import invariant_linear_triton

    return invariant_linear_triton(x2d, weight, bias)


def _tile_linear(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear` of (T * ROW_TILE, K) rows as T tiles of ROW_TILE rows, each bitwise one `F.linear` call:
    on the CPU the entries of one `bmm` / `baddbmm` over the weight expanded to every tile (measured
    independent of T), elsewhere (CUDA without the Triton kernel) a call per tile. (N, K) weight;
    (T * ROW_TILE, N) out."""
    if rows.device.type != "cpu":
        return torch.cat([F.linear(rows[i:i + ROW_TILE], weight, bias) for i in range(0, rows.shape[0], ROW_TILE)])
    batch = rows.view(-1, ROW_TILE, rows.shape[1])  # (T, ROW_TILE, K)
    wt = weight.t().expand(batch.shape[0], *weight.t().shape)  # (T, K, N), no copy
    if bias is None:
        out = torch.bmm(batch, wt)
    else:
        out = torch.baddbmm(bias.expand(batch.shape[0], ROW_TILE, -1), batch, wt)
    return out.view(-1, weight.shape[0])


def invariant_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm (normalise in float32, cast back, scale) on ROW_TILE-padded rows.

    Row-wise ops only (the mean is a last-dim reduction). On the CPU, measured the same bits per row
    for 1..200 tiles of rows at once, so one call covers every tile. On CUDA (`_triton_norm_fits`) a
    Triton kernel with one program per row and a reduction order fixed by the width (other bits than
    this formula in PyTorch, invariant by construction). Elsewhere a reduction kernel may be picked by
    the number of rows, so the rows run in chunks of exactly NORM_CHUNK (zero rows pad).
    """
    _check_2d_input("x", x, weight.shape[-1])
    x2d = x.reshape(-1, x.shape[-1])
    if _triton_norm_fits(x2d, weight):
        return _invariant_rms_norm_triton(x2d, weight, eps).reshape(x.shape)
    out = _rms_rows(x2d, weight, eps, None if x.device.type == "cpu" else NORM_CHUNK)
    return out[: x2d.shape[0]].reshape(x.shape)


def _triton_norm_fits(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `invariant_rms_norm` runs the Triton row kernels: CUDA x and weight of kernel dtypes,
    rows up to TRITON_NORM_MAX_WIDTH wide, Triton importable, the backend not forced to "reference".
    Depends on the model (dtypes, width, device) only, never on the rows."""
    from ._dispatch import HAS_TRITON, get_backend

    if not (x2d.is_cuda and weight.is_cuda and HAS_TRITON and get_backend() != "reference"):
        return False
    return (x2d.dtype in TRITON_LINEAR_DTYPES and weight.dtype in TRITON_LINEAR_DTYPES
            and weight.dim() == 1 and x2d.shape[1] <= TRITON_NORM_MAX_WIDTH)


def _invariant_rms_norm_triton(x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of (rows, H) on the row-invariant Triton kernels (one program per row), on any device
    (CPU tensors need TRITON_INTERPRET=1; the tests call this directly). Triton is imported here."""
    from ._invariant_norm_triton import invariant_rms_norm_triton

    return invariant_rms_norm_triton(x2d, weight, eps)


def _rms_rows(x2d: torch.Tensor, weight: torch.Tensor, eps: float, chunk: Optional[int]) -> torch.Tensor:
    """RMSNorm of the rows padded to ROW_TILE (one call), or to `chunk` rows and run chunk by chunk."""
    xf = _padded_rows(x2d, chunk or ROW_TILE).float()

    def norm(rows):
        rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps)
        return weight * rows.to(x2d.dtype)

    return norm(xf) if chunk is None else torch.cat([norm(xf[i:i + chunk]) for i in range(0, xf.shape[0], chunk)])
