"""Balanced data parallelism over packed batches, and the global-batch arithmetic.

A step's global batch (every sequence, the same list on every rank) is split
across ranks with the Karmarkar-Karp balancer of `fusedrl.packing` on token
counts (optionally plus attention's quadratic cost), keeping RL groups (the G
samples of one prompt) on one rank. Each rank then packs its share into
micro-batches under its own `token_budget`.

The gradient equals one big batch at any world size when each rank divides its
summed loss by `loss_divisor(global_count, world)`: FSDP2 averages gradients
over the W ranks, so sum_r (loss_r * W / N) / W = total / N. The global count
comes from one all-reduce per step (`global_counts`).

    >>> split_for_ranks([900, 300, 700, 100], 2)
    [[0, 3], [1, 2]]
"""
from __future__ import annotations

import numbers
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from fusedrl.packing import _as_lengths, _check_coeff, _check_int, balanced_partition, partition_cost

_COST_SCALE_MAX = 2**40  # quantised group costs stay far inside int64


def _group_index(group_ids, n: int) -> Tuple[List[List[int]], np.ndarray]:
    """Members of each group (first-appearance order) and each sequence's group number."""
    if isinstance(group_ids, torch.Tensor):
        group_ids = group_ids.tolist()
    if not isinstance(group_ids, (list, tuple, np.ndarray)) or len(group_ids) != n:
        raise ValueError(f"group_ids must be a sequence of {n} ids (one per length), got "
                         f"{type(group_ids).__name__} of length {len(group_ids) if hasattr(group_ids, '__len__') else '?'}")
    order: dict = {}
    members: List[List[int]] = []
    of = np.empty(n, dtype=np.int64)
    for i, gid in enumerate(list(group_ids)):
        try:
            g = order.setdefault(gid, len(order))
        except TypeError:
            raise ValueError(f"group_ids[{i}] = {gid!r} is not hashable") from None
        if g == len(members):
            members.append([])
        members[g].append(i)
        of[i] = g
    return members, of


def split_for_ranks(lengths, world_size: int, *, group_ids=None, a: float = 1.0, b: float = 0.0,
                    backend: str = "auto") -> List[List[int]]:
    """Which sequences each rank trains on: near-equal cost a*L + b*L^2 per rank, groups kept whole.

    Deterministic: every rank computes the same split from the same global list.

    Args:
        lengths: (n,) token counts of the step's sequences (integers >= 1).
        world_size: number of data-parallel ranks, >= 1.
        group_ids: optional (n,) hashable ids; sequences with one id (an RL prompt's samples)
            go to one rank. Default: each sequence is its own group.
        a, b: cost coefficients (b > 0 adds attention's quadratic term), as in `balanced_partition`.
        backend: "auto", "cpp" or "python" (the balancer's implementation).
    Returns:
        world_size lists of indices into `lengths` (ascending), heaviest rank first.
    Raises:
        ValueError: bad arguments, or fewer groups than ranks (a rank would have nothing to train on,
            and every rank must take part in every FSDP collective).
    """
    world_size = _check_int("world_size", world_size, 1)
    a, b = _check_coeff("a", a), _check_coeff("b", b)
    lens = _as_lengths(lengths)
    n = int(lens.size)
    if group_ids is None:
        members, of = [[i] for i in range(n)], np.arange(n)
    else:
        members, of = _group_index(group_ids, n)
    if len(members) < world_size:
        raise ValueError(f"split_for_ranks: {len(members)} groups for {world_size} ranks; every rank needs at "
                         "least one (raise the global batch or lower the world size)")
    if a == 0 and b == 0:
        raise ValueError("a and b must not both be 0: every sequence would cost nothing")
    if group_ids is None:
        parts = balanced_partition(lens, world_size, a=a, b=b, backend=backend)
    else:
        costs = np.zeros(len(members))
        np.add.at(costs, of, a * lens + b * lens.astype(np.float64) ** 2)
        # Karmarkar-Karp on group costs: the balancer takes integers, so costs are quantised
        # (relative error <= 1 / 2**40 of the largest group: no effect on the balance).
        scale = _COST_SCALE_MAX / max(costs.max(), 1e-300)
        units = np.maximum(np.rint(costs * scale), 1).astype(np.int64)
        group_parts = balanced_partition(units, world_size, a=1.0, b=0.0, backend=backend)
        parts = [sorted(i for g in part for i in members[g]) for part in group_parts]
    return parts


def load_imbalance(lengths, parts: Sequence[Sequence[int]], *, a: float = 1.0, b: float = 0.0) -> float:
    """max / mean of the per-rank cost (1.0 = perfect balance); the metric to log per step."""
    costs = partition_cost(lengths, parts, a=a, b=b)
    mean = sum(costs) / max(len(costs), 1)
    return max(costs) / mean if mean > 0 else 1.0


def global_counts(tokens: int, seqs: int, device: torch.device | str = "cpu") -> Tuple[int, int]:
    """This step's global (trained tokens, sequences): one all-reduce (SUM) of the two local counts.

    Without a process group the local counts are returned, without a device sync.
    """
    for name, value in (("tokens", tokens), ("seqs", seqs)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return int(tokens), int(seqs)
    counts = torch.tensor([tokens, seqs], dtype=torch.int64, device=device)
    dist.all_reduce(counts)
    total_tokens, total_seqs = counts.tolist()
    return int(total_tokens), int(total_seqs)


def loss_divisor(global_count: int, world_size: int) -> float:
    """What a rank divides its summed loss by so that FSDP2's gradient average gives total / global_count.

    An empty step (global_count 0) divides by 1/world_size: the loss is 0 anyway, never NaN.
    """
    if isinstance(global_count, bool) or not isinstance(global_count, numbers.Integral) or global_count < 0:
        raise ValueError(f"global_count must be an integer >= 0, got {global_count!r}")
    world_size = _check_int("world_size", world_size, 1)
    return max(int(global_count), 1) / world_size


def agree_micro_batches(local_count: int, device: torch.device | str = "cpu") -> int:
    """The number of micro-batches every rank must run this step: the max over ranks (one all-reduce).

    FSDP2 gathers weights and reduces gradients in every forward/backward, so ranks must run
    the same number of them; a rank with fewer real micro-batches runs extra ones with its loss
    multiplied by 0 (e.g. its last batch again), which adds zero gradient.
    """
    local_count = _check_int("local_count", local_count, 1)
    if not (dist.is_available() and dist.is_initialized()):
        return local_count
    count = torch.tensor([local_count], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def owners(parts: Sequence[Sequence[int]]) -> List[int]:
    """For each sequence index, the rank that trains it (inverse of the split); a logging/test helper."""
    n = sum(len(p) for p in parts)
    owner = [-1] * n
    for r, part in enumerate(parts):
        for i in part:
            if not 0 <= i < n or owner[i] != -1:
                raise ValueError(f"parts must cover 0..{n - 1} exactly once; index {i} is out of range or repeated")
            owner[i] = r
    return owner
