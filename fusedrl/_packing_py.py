"""Pure-Python packing and balancing: the fallback and test oracle of `fusedrl._C`.

Same algorithms as csrc/packing.cpp, step for step: the same orderings, the
same tie-breaks and the same floating-point operations in the same order, so
both return identical groups. Arguments arrive validated by `fusedrl.packing`
(lengths: a list of Python ints >= 1).
"""
from __future__ import annotations

import bisect
import heapq
from typing import List, Sequence, Tuple


def _longest_first(lengths: Sequence[int]) -> List[int]:
    """Indices sorted by length, longest first; equal lengths keep index order."""
    return sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)


def pack_by_budget(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Best-fit decreasing: each sequence, longest first, goes into the open bin
    with the least room that still fits it (of equally tight bins, the one most
    recently stored: opened or placed into), or into a new bin.

    Returns bins in creation order, each a list of indices in ascending order.
    """
    order = _longest_first(lengths)
    if not order:
        return []
    # A bin with less room than the shortest sequence can take nothing more: it is closed.
    shortest = lengths[order[-1]]
    bins: List[List[int]] = []
    open_bins: List[Tuple[int, int, int]] = []  # sorted (room, -store stamp, bin id)
    stamp = 0
    for i in order:
        length = lengths[i]
        pos = bisect.bisect_left(open_bins, (length, -stamp - 1))
        if pos == len(open_bins):
            room, bin_id = budget, len(bins)
            bins.append([i])
        else:
            room, _, bin_id = open_bins.pop(pos)
            bins[bin_id].append(i)
        if room - length >= shortest:
            stamp += 1
            bisect.insort(open_bins, (room - length, -stamp, bin_id))
    for members in bins:
        members.sort()
    return bins


def sequence_cost(length: int, a: float, b: float) -> float:
    """cost(L) = a*L + b*L^2, rounded exactly as the C++ core rounds it."""
    return a * length + b * (length * length)


# A subset is (cost, members) with members a tree of nested pairs of item ids
# (joining two subsets is O(1)); a partition keeps its non-empty subsets only,
# largest cost first (see csrc/packing.cpp for why that orders like the dense form).
def _merge(x: list, y: list, k: int) -> list:
    """Subset j of the result = x[j] joined with y[k-1-j], visiting non-empty positions in increasing j."""
    p, q = len(x), len(y)
    out = []
    for j in range(p):
        other = k - 1 - j
        if other < q:
            u, v = x[j], y[other]
            out.append((u[0] + v[0], (u[1], v[1])))
        else:
            out.append(x[j])
    for j in range(max(p, k - q), k):
        out.append(y[k - 1 - j])
    out.sort(key=lambda s: s[0], reverse=True)  # stable, like std::stable_sort
    return out


def _flatten(tree) -> List[int]:
    items, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, tuple):
            stack.extend(node)
        else:
            items.append(node)
    items.sort()
    return items


def _differencing(partitions: List[list], k: int) -> List[List[int]]:
    """Merge the two partitions with the largest spread until one is left."""
    heap = []
    for pid, part in enumerate(partitions):
        low = 0.0 if len(part) < k else part[-1][0]
        heap.append((-(part[0][0] - low), pid, pid))
    heapq.heapify(heap)  # ids are unique, so the order is total and heapify == repeated push
    next_id = len(partitions)
    while len(heap) > 1:
        _, _, first = heapq.heappop(heap)
        _, _, second = heapq.heappop(heap)
        merged = _merge(partitions[first], partitions[second], k)
        partitions[first], partitions[second] = merged, None
        low = 0.0 if len(merged) < k else merged[-1][0]
        heapq.heappush(heap, (-(merged[0][0] - low), next_id, first))
        next_id += 1
    final = partitions[heap[0][2]]
    groups = [_flatten(members) for _, members in final]
    return groups + [[] for _ in range(k - len(groups))]


def balanced_partition(lengths: Sequence[int], k: int, a: float, b: float, equal_size: bool) -> List[List[int]]:
    """k-way largest differencing (Karmarkar-Karp) under cost a*L + b*L^2.

    Plain: item i starts as the partition ({i}, {}, ..., {}). Balanced
    (equal_size): items sorted longest first enter k at a time, one per subset,
    so group sizes differ by at most one. Returns k groups, costliest first,
    each a list of indices in ascending order (empty groups last).
    """
    n = len(lengths)
    if n == 0:
        return [[] for _ in range(k)]
    cost = [sequence_cost(length, a, b) for length in lengths]
    # Partitions are created longest item first: their creation order breaks spread ties.
    order = _longest_first(lengths)
    if not equal_size:
        partitions = [[(cost[i], i)] for i in order]
    else:
        partitions = [[(cost[i], i) for i in order[start:start + k]] for start in range(0, n, k)]
    return _differencing(partitions, k)
