"""The loop's data-parallel hook: global micro-batches -> each rank's share (fusedrl.train.dp_split)."""
import numpy as np
import pytest
import torch

from fusedrl.data.batch import PackedBatch
from fusedrl.data.packed import Example, pack_examples
from fusedrl.stages.groups import GroupedDataset
from fusedrl.train.dp_split import rank_share, repack, unpack


def _examples(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 50, (n,), generator=gen).tolist()
        prompt = max(1, n // 3)
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def _sft_batches(lengths, budget, seed=0):
    examples = _examples(lengths, seed)
    extras = [{"score": torch.tensor(float(i)), "tok": torch.arange(len(e), dtype=torch.float32) + 100 * i}
              for i, e in enumerate(examples)]
    return pack_examples(examples, budget, extras=extras, token_keys=("tok",))


def _by_example(batches):
    """example index -> (ids, labels, tok, score) over all batches."""
    out = {}
    for b in batches:
        bounds = b.cu_seqlens.tolist()
        for k, i in enumerate(b.extras["example_index"].tolist()):
            s, e = bounds[k], bounds[k + 1]
            out[i] = (b.input_ids[s:e].tolist(), b.labels[s:e].tolist(), b.extras["tok"][s:e].tolist(),
                      float(b.extras["score"][k]))
    return out


def test_shares_cover_the_step_once_with_every_extra_intact():
    batches = _sft_batches([5, 17, 9, 30, 3, 12, 22, 8, 4], budget=40)
    want = _by_example(batches)
    got, counts = {}, []
    for rank in range(3):
        share = rank_share(batches, rank, 3, token_budget=32)
        assert all(b.total <= 32 for b in share.batches)
        for b in share.batches:
            assert b.num_tokens == int((b.labels != -100).sum())
            assert b.position_ids.tolist() == [p for n in (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
                                               for p in range(n)]
        part = _by_example(share.batches)
        assert not set(part) & set(got)
        got.update(part)
        counts.append(len(share.batches) + share.padding)
    assert got == want
    assert len(set(counts)) == 1  # every rank runs as many micro-batches (padding included)


def test_uneven_micro_batch_counts_are_padded():
    batches = _sft_batches([30, 30, 30, 30, 4], budget=64)
    shares = [rank_share(batches, r, 2, token_budget=32) for r in range(2)]
    real = [len(s.batches) for s in shares]
    assert real[0] != real[1]
    assert [len(s.batches) + s.padding for s in shares] == [max(real)] * 2
    short = shares[real.index(min(real))]
    assert short.padding == max(real) - min(real) and short.pad_batch is short.batches[0]


def test_groups_stay_whole_and_ranking_is_rebuilt():
    examples = _examples([6, 9, 12, 5, 7, 14, 8, 8, 10, 3], seed=1)
    groups = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    data = GroupedDataset(examples, groups, token_budget=48, seed=0, shuffle=False)
    batches = data.next_batches(len(data))
    seen = []
    for rank in range(2):
        for b in rank_share(batches, rank, 2, token_budget=30).batches:
            g = b.extras["ranking"].shape[0]
            assert b.num_groups == g and b.num_seqs == 2 * g
            assert b.extras["ranking"].tolist() == torch.arange(2 * g).view(g, 2).tolist()
            ids = b.extras["example_index"].tolist()
            for gi, (first, second) in zip(b.extras["group_index"].tolist(), zip(ids[0::2], ids[1::2])):
                assert [first, second] == groups[gi]  # members together, in order
                seen.append(gi)
    assert sorted(seen) == list(range(5))


def test_round_trip_of_one_batch():
    (batch,) = _sft_batches([7, 11, 4], budget=64)
    again = repack(unpack(batch))
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(again, name), getattr(batch, name)), name
    assert again.num_tokens == batch.num_tokens and again.max_seqlen == batch.max_seqlen
    for key, value in batch.extras.items():
        assert torch.equal(again.extras[key], value), key


def test_balance_on_a_skewed_length_distribution():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.5, 1.0, 256).astype(int), 2, 1024).tolist()
    assert max(lengths) / np.mean(lengths) > 8  # skewed
    batches = _sft_batches(lengths, budget=1024, seed=2)
    for world in (2, 4, 8):
        share = rank_share(batches, 0, world, token_budget=1024)
        assert share.imbalance <= 1.05, (world, share.imbalance)


def test_fewer_sequences_than_ranks_pad_the_idle_rank():
    batches = _sft_batches([9], budget=16)
    busy, idle = rank_share(batches, 0, 2, 16), rank_share(batches, 1, 2, 16)
    assert len(busy.batches) == 1 and busy.padding == 0
    assert idle.batches == [] and idle.padding == 1 and idle.pad_batch.num_seqs == 1


def test_bad_input_raises():
    batches = _sft_batches([5, 6], budget=16)
    with pytest.raises(ValueError, match="batches"):
        rank_share([], 0, 2, 16)
    with pytest.raises(ValueError, match="rank"):
        rank_share(batches, 2, 2, 16)
    odd = PackedBatch(**{k: getattr(batches[0], k) for k in ("input_ids", "labels", "position_ids", "cu_seqlens",
                                                             "max_seqlen", "num_tokens")},
                      extras={"weird": torch.zeros(3)})
    with pytest.raises(ValueError, match="weird"):
        rank_share([odd], 0, 2, 16)
