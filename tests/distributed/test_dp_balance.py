"""split_for_ranks / load_imbalance / the global-batch helpers, in one process (no process group)."""
import numpy as np
import pytest

from fusedrl.packing import partition_cost
from fusedrl.train.dp_balance import (agree_micro_batches, global_counts, load_imbalance, loss_divisor, owners,
                                      split_for_ranks)


def _skewed(n=512, seed=0):
    # Long-tailed lengths (most short, a few near the cap), as in RL rollouts and chat SFT.
    rng = np.random.default_rng(seed)
    return np.minimum(np.rint(rng.lognormal(5.0, 1.1, n)).astype(np.int64) + 1, 8192)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_balance_on_skewed_lengths_within_1_05(world):
    lengths = _skewed()
    assert lengths.max() / lengths.mean() > 10  # really skewed
    parts = split_for_ranks(lengths, world)
    assert sorted(i for p in parts for i in p) == list(range(lengths.size))
    imbalance = load_imbalance(lengths, parts)
    assert imbalance <= 1.05, imbalance
    # Far better than handing out contiguous slices (what a naive sampler does).
    naive = np.array_split(np.arange(lengths.size), world)
    assert imbalance < load_imbalance(lengths, [list(c) for c in naive])


def test_balance_with_attention_cost():
    lengths, b = _skewed(seed=1), 1 / 4096
    parts = split_for_ranks(lengths, 4, b=b)
    assert load_imbalance(lengths, parts, b=b) <= 1.05


def test_groups_stay_whole_and_balanced():
    lengths = _skewed(n=512, seed=2)
    groups = np.repeat(np.arange(64), 8)  # 64 prompts x G = 8 samples
    parts = split_for_ranks(lengths, 4, group_ids=groups)
    rank_of = owners(parts)
    for g in range(64):
        assert len({rank_of[i] for i in np.flatnonzero(groups == g)}) == 1, g
    assert load_imbalance(lengths, parts) <= 1.05


def test_group_costs_use_the_quadratic_term():
    # Groups 0 and 1 hold 1000 tokens each; with b = 1e-2 group 0 (one long sequence) costs
    # 1000 + 1e4 = 11000 and group 1 (four of 250) 4 * (250 + 625) = 3500: it must sit alone.
    lengths = [1000, 250, 250, 250, 250, 10, 10]
    groups = [0, 1, 1, 1, 1, 2, 3]
    linear = split_for_ranks(lengths, 2, group_ids=groups)
    assert sorted(map(sorted, linear)) == [[0, 5], [1, 2, 3, 4, 6]] or sorted(map(sorted, linear)) == [[0, 6], [1, 2, 3, 4, 5]]
    quadratic = split_for_ranks(lengths, 2, group_ids=groups, b=1e-2)
    assert sorted(map(sorted, quadratic)) == [[0], [1, 2, 3, 4, 5, 6]]
    assert max(partition_cost(lengths, quadratic, b=1e-2)) == pytest.approx(11000)


def test_split_is_deterministic_and_documented_example():
    assert split_for_ranks([900, 300, 700, 100], 2) == [[0, 3], [1, 2]]
    lengths = _skewed(n=100, seed=3)
    assert split_for_ranks(lengths, 3) == split_for_ranks(list(lengths), 3)


def test_split_errors_name_the_argument():
    with pytest.raises(ValueError, match="3 groups for 4 ranks"):
        split_for_ranks([5, 6, 7], 4)
    with pytest.raises(ValueError, match="group_ids"):
        split_for_ranks([5, 6, 7], 2, group_ids=[0, 1])
    with pytest.raises(ValueError, match="world_size"):
        split_for_ranks([5, 6], 0)
    with pytest.raises(ValueError, match="lengths"):
        split_for_ranks([5, 0], 2)
    with pytest.raises(ValueError, match="both be 0"):
        split_for_ranks([5, 6], 2, a=0.0)


def test_global_helpers_single_process():
    assert global_counts(17, 3) == (17, 3)
    assert loss_divisor(100, 4) == 25.0 and loss_divisor(0, 2) == 0.5
    assert agree_micro_batches(3) == 3
    with pytest.raises(ValueError, match="tokens"):
        global_counts(-1, 3)
    with pytest.raises(ValueError, match="global_count"):
        loss_divisor(2.5, 2)
    with pytest.raises(ValueError, match="parts"):
        owners([[0, 1], [1]])
