"""Sequence packing and load balancing: token-budget micro-batches, balanced groups, varlen metadata.

Two implementations of the same algorithms give identical results: the C++
core `fusedrl._C` (csrc/packing.cpp, used when it imports) and a pure-Python
one (`fusedrl._packing_py`). `backend="auto"` picks C++ when present,
`"cpp"` insists on it, `"python"` forces the fallback.

    >>> from fusedrl.packing import pack_by_budget, balanced_partition
    >>> pack_by_budget([900, 300, 700, 100], budget=1000)
    [[0, 3], [1, 2]]
    >>> balanced_partition([900, 300, 700, 100], k=2)
    [[0, 3], [1, 2]]

Over-long sequences: `pack_by_budget` raises ValueError when a length exceeds
the budget; it never drops or splits a sequence. Dropping or truncating is a
data-policy decision the caller makes (and logs) before packing, so a packed
batch always holds every sequence it was given.

Costs: a sequence of L tokens costs a*L + b*L^2 (b models attention's
quadratic term; with a=1, b=1/4096 the attention term equals the linear one
at 4096 tokens).

Agreement: both backends follow the same orderings, tie-breaks and float
operations, so they return the same groups exactly (tolerance zero; the
tests compare them with ==), hence the same max-group cost.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Sequence, Tuple

import numpy as np
import torch

from fusedrl import _packing_py

try:
    from fusedrl import _C
except ImportError:  # built without the extension (FUSEDRL_NO_EXT=1) or not built yet
    _C = None

BACKEND: str = "cpp" if _C is not None else "python"
HAS_CSRC: bool = _C is not None  # whether the C++ extension fusedrl._C is built
BACKENDS = ("auto", "cpp", "python")
_INT64_MAX = 2**63 - 1


def _resolve_backend(backend: str):
    """The module implementing `backend`: fusedrl._C or fusedrl._packing_py."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpp" and _C is None:
        raise RuntimeError(
            "backend='cpp' was requested but the C++ extension fusedrl._C is not built; "
            "rebuild with `pip install --no-build-isolation -e .` or use backend='python'"
        )
    if backend == "python" or _C is None:
        return _packing_py
    return _C


def _as_lengths(lengths) -> np.ndarray:
    """Validate `lengths` (list/tuple/numpy/1-D integer tensor of values >= 1) into int64 numpy."""
    if isinstance(lengths, torch.Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must hold integers, got a tensor of dtype {lengths.dtype}")
        lengths = lengths.detach().cpu().numpy()
    elif not isinstance(lengths, np.ndarray):
        if not isinstance(lengths, (list, tuple)):
            raise ValueError(f"lengths must be a list, tuple, numpy array or 1-D tensor, got {type(lengths).__name__}")
        # numpy infers the dtype in C (a per-element Python check costs ~30x more);
        # only a list that is not all integers takes the slow path, to name the culprit.
        try:
            array = np.array(lengths) if lengths else np.zeros(0, dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            array = None
        if array is None or array.dtype.kind not in "iu":
            for i, value in enumerate(lengths):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise ValueError(f"lengths must hold integers, got lengths[{i}] = {value!r}")
            raise ValueError("lengths must hold integers that fit in int64")
        lengths = array
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.size and lengths.dtype.kind not in "iu":
        raise ValueError(f"lengths must hold integers, got an array of dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64, copy=False)
    if lengths.size and lengths.min() < 1:
        i = int(np.argmax(lengths < 1))
        raise ValueError(f"lengths must be >= 1, got lengths[{i}] = {int(lengths[i])}")
    return np.ascontiguousarray(lengths)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_coeff(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def pack_by_budget(lengths, budget: int, *, backend: str = "auto") -> List[List[int]]:
    """Best-fit-decreasing bin packing of sequences into bins of at most `budget` tokens.

    Sequences are placed longest first (ties by index), each into the open bin
    whose remaining room is the smallest that still fits it (of equally tight
    bins, the one used most recently), else into a new bin. Deterministic.

    Args:
        lengths: (n,) sequence lengths, integers >= 1 (list, tuple, numpy array or 1-D int tensor).
        budget: tokens per bin, an integer >= 1.
        backend: "auto", "cpp" or "python".
    Returns:
        Bins in creation order; each bin lists indices into `lengths` in ascending
        order. Every index appears exactly once; a bin's lengths sum to <= budget.
    Raises:
        ValueError: bad arguments, or a length greater than `budget` (named by index).
    """
    impl = _resolve_backend(backend)
    budget = _check_int("budget", budget, 1)
    lens = _as_lengths(lengths)
    if lens.size and lens.max() > budget:
        i = int(np.argmax(lens > budget))
        raise ValueError(
            f"lengths[{i}] = {int(lens[i])} exceeds budget = {budget}; pack_by_budget never drops a "
            "sequence: truncate or drop it before packing, or raise the budget"
        )
    if budget > _INT64_MAX and lens.size:
        # Beyond the C++ core's int64. A budget >= the total puts everything in
        # bin 0, so the total (exact, as a Python int) gives the same result.
        budget = max(min(budget, sum(lens.tolist())), int(lens.max()))
    if impl is _C:
        return _C.pack_by_budget(lens, budget)
    return _packing_py.pack_by_budget(lens.tolist(), budget)


def balanced_partition(lengths, k: int, *, a: float = 1.0, b: float = 0.0, equal_size: bool = False,
                       backend: str = "auto") -> List[List[int]]:
    """Split sequences into k groups of near-equal total cost (Karmarkar-Karp, k-way).

    Largest differencing method: every sequence starts as a k-way partition
    with one non-empty subset; the two partitions with the largest spread
    (max - min subset cost) are merged, largest subset with smallest, until
    one is left. With `equal_size` the balanced variant is used: sequences
    sorted longest first enter k at a time, one per subset, so group sizes
    differ by at most one. O(n log n + n k log k) time. Deterministic.

    Args:
        lengths: (n,) sequence lengths, integers >= 1.
        k: number of groups, an integer >= 1 (n < k leaves some groups empty,
            also with equal_size, where sizes are then 1 and 0).
        a, b: cost(L) = a*L + b*L^2, both finite, >= 0 and not both 0.
        equal_size: keep group sizes within one of each other.
        backend: "auto", "cpp" or "python".
    Returns:
        k groups, costliest first (empty groups last), each listing indices into
        `lengths` in ascending order; every index appears exactly once.
    """
    impl = _resolve_backend(backend)
    k = _check_int("k", k, 1)
    a, b = _check_coeff("a", a), _check_coeff("b", b)
    if a == 0 and b == 0:
        raise ValueError("a and b must not both be 0: every sequence would cost nothing")
    if not isinstance(equal_size, bool):
        raise ValueError(f"equal_size must be a bool, got {equal_size!r}")
    lens = _as_lengths(lengths)
    if impl is _C:
        return _C.balanced_partition(lens, k, a, b, equal_size)
    return _packing_py.balanced_partition(lens.tolist(), k, a, b, equal_size)


def partition_cost(lengths, groups: Sequence[Sequence[int]], *, a: float = 1.0, b: float = 0.0) -> List[float]:
    """Total cost a*L + b*L^2 of each group (a report/test helper).

    Args:
        lengths: (n,) sequence lengths, integers >= 1.
        groups: lists of indices into `lengths`.
    Returns:
        One float per group.
    """
    a, b = _check_coeff("a", a), _check_coeff("b", b)
    lens = _as_lengths(lengths).tolist()
    costs = []
    for g, group in enumerate(groups):
        total = 0.0
        for i in group:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < len(lens):
                raise ValueError(f"groups[{g}] holds {i!r}, expected an index in [0, {len(lens)})")
            total += _packing_py.sequence_cost(lens[i], a, b)
        costs.append(total)
    return costs


def cu_seqlens_and_positions(lengths) -> Tuple[torch.Tensor, torch.Tensor]:
    """Varlen metadata of one packed group, following the flash-attention contract.

    Args:
        lengths: (n,) lengths of the sequences packed back to back, integers >= 1.
    Returns:
        cu_seqlens: (n + 1,) int32, [0, L0, L0 + L1, ...].
        position_ids: (sum(lengths),) int64, restarting at 0 in every sequence.
    """
    lens = torch.from_numpy(_as_lengths(lengths))
    total = int(lens.sum()) if lens.numel() else 0
    if total > torch.iinfo(torch.int32).max:
        raise ValueError(f"lengths must sum to at most {torch.iinfo(torch.int32).max} tokens for int32 cu_seqlens, got {total}")
    cu_seqlens = torch.zeros(lens.numel() + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=cu_seqlens[1:])
    starts = torch.repeat_interleave(cu_seqlens[:-1], lens)
    position_ids = torch.arange(total, dtype=torch.int64) - starts
    return cu_seqlens.to(torch.int32), position_ids
