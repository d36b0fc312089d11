"""Packing and balancing: C++ vs Python agreement, invariants, balance quality, bad inputs.

The C++ core and the Python fallback run the same algorithm with the same
tie-breaks and float operations, so their outputs must be identical (not just
equally good); the quality checks then hold for both.
"""
import random

import numpy as np
import pytest
import torch

from fusedrl import packing
from fusedrl.packing import balanced_partition, cu_seqlens_and_positions, pack_by_budget, partition_cost

needs_cpp = pytest.mark.skipif(packing._C is None, reason="fusedrl._C is not built")


def _lengths(seed, n, low=16, high=4096):
    rnd = random.Random(seed)
    return [rnd.randint(low, high) for _ in range(n)]


def _assert_exact_cover(groups, n):
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(n)), "every index must appear exactly once"
    for g in groups:
        assert g == sorted(g), "indices within a group are ascending"


@needs_cpp
@pytest.mark.parametrize("seed,n,k,a,b,equal_size", [
    (0, 1, 3, 1.0, 0.0, False),
    (8, 500, 1, 1.0, 0.0, True),
    (9, 500, 1, 1.0, 0.0, False),
    (1, 7, 3, 1.0, 0.0, True),
    (2, 257, 8, 1.0, 1 / 4096, False),
    (3, 257, 8, 1.0, 1 / 4096, True),
    (4, 2000, 5, 0.5, 1e-3, False),
    (5, 2000, 64, 1.0, 0.0, True),
    (6, 1999, 13, 0.0, 1.0, False),
    (7, 300, 1000, 1.0, 0.25, False),
])
def test_partition_cpp_matches_python(seed, n, k, a, b, equal_size):
    lengths = _lengths(seed, n)
    cpp = balanced_partition(lengths, k, a=a, b=b, equal_size=equal_size, backend="cpp")
    py = balanced_partition(lengths, k, a=a, b=b, equal_size=equal_size, backend="python")
    assert cpp == py
    assert len(cpp) == k
    _assert_exact_cover(cpp, n)


@needs_cpp
@pytest.mark.parametrize("equal_size", [False, True])
def test_partition_cpp_matches_python_long_lengths(equal_size):
    # Lengths far above n take the C++ comparison sort instead of the counting sort.
    lengths = _lengths(12, 1000, 1, 10**7)
    cpp = balanced_partition(lengths, 6, a=1.0, b=1e-6, equal_size=equal_size, backend="cpp")
    assert cpp == balanced_partition(lengths, 6, a=1.0, b=1e-6, equal_size=equal_size, backend="python")
    assert pack_by_budget(lengths, 10**7, backend="cpp") == pack_by_budget(lengths, 10**7, backend="python")


@needs_cpp
def test_partition_cpp_matches_python_with_many_ties():
    # Few distinct lengths: spread and cost ties everywhere exercise the tie-breaks.
    lengths = _lengths(11, 1500, 1, 4)
    for k, equal_size in [(2, False), (7, False), (7, True), (32, True)]:
        cpp = balanced_partition(lengths, k, equal_size=equal_size, backend="cpp")
        assert cpp == balanced_partition(lengths, k, equal_size=equal_size, backend="python")


@needs_cpp
@pytest.mark.parametrize("seed,n,low,high,budget", [
    (0, 1, 1, 16, 16),
    (1, 500, 1, 4096, 4096),
    (2, 2000, 1, 4096, 8192),
    (3, 2000, 16, 4096, 16384),
    (4, 2000, 1, 6, 10),             # room ties everywhere
    (5, 300, 1000, 10**6, 3 * 10**6),  # budget large next to n: the C++ tree-based path
])
def test_pack_cpp_matches_python(seed, n, low, high, budget):
    lengths = _lengths(seed, n, low, high)
    cpp = pack_by_budget(lengths, budget, backend="cpp")
    assert cpp == pack_by_budget(lengths, budget, backend="python")


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_pack_respects_budget_and_is_near_optimal(backend):
    lengths = _lengths(0, 2000, 1, 4096)
    budget = 8192
    bins = pack_by_budget(lengths, budget, backend=backend)
    _assert_exact_cover(bins, len(lengths))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= budget
    lower = -(-sum(lengths) // budget)  # no packing can use fewer bins
    assert len(bins) <= lower + 3, (len(bins), lower)


def test_pack_hand_example():
    # Longest first: 900 opens bin 0 (room 100), 700 opens bin 1 (room 300),
    # 300 fits bin 1 exactly, 100 fits bin 0 exactly.
    assert pack_by_budget([900, 300, 700, 100], 1000) == [[0, 3], [1, 2]]
    # Best fit, not first fit: 7 opens bin 0 (room 3), 5 opens bin 1 (room 5), 4 joins
    # bin 1 (room 1); then 1 goes to the tightest bin, bin 1, not the first one that fits.
    assert pack_by_budget([7, 5, 4, 1], 10, backend="python") == [[0], [1, 2, 3]]
    # Equally tight bins: the most recently used one wins (6 -> bin 0, 6 -> bin 1, both
    # with room 4; 4 -> bin 1).
    assert pack_by_budget([6, 6, 4], 10, backend="python") == [[0], [1, 2]]
    assert pack_by_budget([], 10) == []
    for backend in ["python"] + (["cpp"] if packing._C is not None else []):
        assert pack_by_budget([5, 9, 2], 2**70, backend=backend) == [[0, 1, 2]]


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("a,b", [(1.0, 0.0), (1.0, 1 / 4096)])
def test_partition_balance_quality(backend, a, b):
    lengths = _lengths(3, 2000)
    k = 8
    groups = balanced_partition(lengths, k, a=a, b=b, backend=backend)
    costs = partition_cost(lengths, groups, a=a, b=b)
    bound = max(sum(costs) / k, max(a * L + b * L * L for L in lengths))
    assert max(costs) <= 1.001 * bound, (max(costs), bound)
    round_robin = [list(range(j, len(lengths), k)) for j in range(k)]
    assert max(costs) < max(partition_cost(lengths, round_robin, a=a, b=b))
    assert costs == sorted(costs, reverse=True), "groups come costliest first"


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("n,k", [(2000, 8), (2001, 8), (99, 10), (5, 8)])
def test_partition_equal_size(backend, n, k):
    lengths = _lengths(n, n)
    groups = balanced_partition(lengths, k, a=1.0, b=1 / 4096, equal_size=True, backend=backend)
    _assert_exact_cover(groups, n)
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    if n >= 20 * k:
        costs = partition_cost(lengths, groups, a=1.0, b=1 / 4096)
        assert max(costs) <= 1.01 * sum(costs) / k


def test_partition_hand_example():
    # LDM: {900} - {700} -> ({900}, {700}) spread 200; with {300} -> ({300, 700}, {900})
    # spread 100; with {100} (older id wins the spread tie) -> ({100, 900}, {300, 700}).
    assert balanced_partition([900, 300, 700, 100], 2, backend="python") == [[0, 3], [1, 2]]
    # Ties: {0} and {1} merge first into ({0}, {1}); the older {2} then leads, its
    # subset first, the other partition's subsets reversed (smallest first).
    assert balanced_partition([5, 5, 5], 5) == [[2], [1], [0], [], []]
    assert balanced_partition([], 3) == [[], [], []]
    assert balanced_partition([3, 1, 2], 1) == [[0, 1, 2]]


def test_partition_cost():
    assert partition_cost([2, 3, 4], [[0, 2], [1]], a=1.0, b=0.5) == [2 + 2 + 4 + 8, 3 + 4.5]
    with pytest.raises(ValueError, match=r"groups\[0\] holds 3"):
        partition_cost([2, 3, 4], [[3]])


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_input_types_agree(backend):
    values = [7, 3, 9, 1, 4]
    expected = balanced_partition(values, 2, backend=backend)
    for form in (tuple(values), np.array(values, dtype=np.int32), np.array(values, dtype=np.uint16),
                 torch.tensor(values), torch.tensor(values, dtype=torch.int32)):
        assert balanced_partition(form, 2, backend=backend) == expected
        assert pack_by_budget(form, 10, backend=backend) == pack_by_budget(values, 10, backend=backend)


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_bad_inputs(backend):
    with pytest.raises(ValueError, match=r"lengths\[3\] = 5000 exceeds budget = 4096"):
        pack_by_budget([10, 20, 30, 5000], 4096, backend=backend)
    with pytest.raises(ValueError, match=r"lengths must be >= 1, got lengths\[1\] = 0"):
        pack_by_budget([3, 0, 2], 10, backend=backend)
    with pytest.raises(ValueError, match=r"lengths must be >= 1, got lengths\[2\] = -4"):
        balanced_partition([3, 1, -4], 2, backend=backend)
    with pytest.raises(ValueError, match=r"lengths must hold integers, got lengths\[1\] = 2.5"):
        balanced_partition([3, 2.5], 2, backend=backend)
    with pytest.raises(ValueError, match=r"lengths must hold integers, got lengths\[1\] = None"):
        pack_by_budget((3, None), 10, backend=backend)
    with pytest.raises(ValueError, match="lengths must hold integers that fit in int64"):
        pack_by_budget([2**70], 10, backend=backend)
    with pytest.raises(ValueError, match="lengths must hold integers, got a tensor of dtype torch.float32"):
        balanced_partition(torch.ones(3), 2, backend=backend)
    with pytest.raises(ValueError, match="lengths must hold integers, got an array of dtype float64"):
        pack_by_budget(np.ones(3), 10, backend=backend)
    with pytest.raises(ValueError, match=r"lengths must be 1-D, got shape \(2, 2\)"):
        pack_by_budget(np.ones((2, 2), dtype=np.int64), 10, backend=backend)
    with pytest.raises(ValueError, match="lengths must be a list, tuple, numpy array or 1-D tensor, got str"):
        pack_by_budget("123", 10, backend=backend)
    with pytest.raises(ValueError, match="budget must be >= 1, got 0"):
        pack_by_budget([1], 0, backend=backend)
    with pytest.raises(ValueError, match="budget must be an integer >= 1, got 2.0"):
        pack_by_budget([1], 2.0, backend=backend)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        balanced_partition([1, 2], 0, backend=backend)
    with pytest.raises(ValueError, match="a must be a finite number >= 0, got -1"):
        balanced_partition([1, 2], 2, a=-1, backend=backend)
    with pytest.raises(ValueError, match="b must be a finite number >= 0, got nan"):
        balanced_partition([1, 2], 2, b=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="a and b must not both be 0"):
        balanced_partition([1, 2], 2, a=0.0, b=0.0, backend=backend)
    with pytest.raises(ValueError, match="equal_size must be a bool"):
        balanced_partition([1, 2], 2, equal_size=1, backend=backend)


def test_bad_backend_and_missing_extension(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cpp', 'python'\), got 'cuda'"):
        pack_by_budget([1], 4, backend="cuda")
    monkeypatch.setattr(packing, "_C", None)
    with pytest.raises(RuntimeError, match="backend='cpp' was requested but the C\\+\\+ extension fusedrl._C is not built"):
        balanced_partition([1, 2], 2, backend="cpp")
    # "auto" falls back to Python without the extension.
    assert balanced_partition([900, 300, 700, 100], 2) == [[0, 3], [1, 2]]


@needs_cpp
def test_cpp_core_checks_its_own_arguments():
    # The Python wrapper validates first; the C++ core still refuses bad input on its own.
    with pytest.raises(ValueError, match=r"lengths must be >= 1, got lengths\[1\] = 0"):
        packing._C.balanced_partition(np.array([3, 0]), 2, 1.0, 0.0, False)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 9 exceeds budget = 8"):
        packing._C.pack_by_budget([9], 8)
    with pytest.raises(ValueError, match="k must be >= 1"):
        packing._C.balanced_partition([1], 0, 1.0, 0.0, False)


def test_backend_flag_matches_extension():
    assert packing.BACKEND == ("cpp" if packing._C is not None else "python")
    assert packing.HAS_CSRC == (packing._C is not None)


def test_cu_seqlens_and_positions():
    cu_seqlens, positions = cu_seqlens_and_positions([3, 1, 2])
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 4, 6]
    assert positions.dtype == torch.int64 and positions.tolist() == [0, 1, 2, 0, 0, 1]
    cu_seqlens, positions = cu_seqlens_and_positions(torch.tensor([2]))
    assert cu_seqlens.tolist() == [0, 2] and positions.tolist() == [0, 1]
    cu_seqlens, positions = cu_seqlens_and_positions([])
    assert cu_seqlens.tolist() == [0] and positions.numel() == 0 and positions.dtype == torch.int64
    with pytest.raises(ValueError, match=r"lengths must be >= 1, got lengths\[0\] = 0"):
        cu_seqlens_and_positions([0, 2])
    with pytest.raises(ValueError, match="lengths must sum to at most 2147483647"):
        cu_seqlens_and_positions([2**31 - 1, 1])


def test_module_docstring_examples():
    import doctest

    result = doctest.testmod(packing, verbose=False)
    assert result.attempted >= 3 and result.failed == 0


def test_bench_packing_smoke(tmp_path):
    from fusedrl.bench import bench_packing

    rows = bench_packing.run(n=200, repeats=1, results_dir=str(tmp_path))
    assert {r["op"] for r in rows} >= {"balanced_partition", "pack_by_budget"}
    for r in rows:
        assert r["python_ms"] > 0
        if packing._C is None:
            assert r["status"].startswith("cpp skipped") and "cpp_ms" not in r
        else:
            assert r["same_result"] is True and r["status"] == "ok" and r["cpp_ms"] > 0
    assert list(tmp_path.glob("packing-*.json"))
