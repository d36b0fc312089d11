"""Block manager and scheduler bookkeeping without a model: ref counts, copy-on-write, preemption, budget."""
import pytest

from fusedrl.rollout.native.block_manager import BlockManager
from fusedrl.rollout.native.scheduler import Scheduler
from fusedrl.rollout.native.sequence import Sequence, Status


def test_fork_shares_blocks_and_copy_on_write_the_partial_one():
    bm = BlockManager(10, 4)
    prompt = Sequence(0, list(range(6)), max_new_tokens=5)
    bm.allocate(prompt, 6)
    assert prompt.block_table == [0, 1] and bm.num_used == 2
    children = [prompt.fork(j, stream=j) for j in range(3)]
    for c in children:
        bm.fork(c)
    bm.free(prompt)
    assert bm.ref_counts[:2] == [3, 3] and bm.num_used == 2
    copies = [bm.make_writable(c, 6) for c in children]  # position 6 lies in the shared partial block 1
    assert copies[0] == (1, 2) and copies[1] == (1, 3) and copies[2] is None  # the last holder writes in place
    assert [c.block_table for c in children] == [[0, 2], [0, 3], [0, 1]]
    assert bm.make_writable(children[0], 2) is not None  # the full block 0 is still shared: a write would copy it
    for c in children:
        bm.free(c)
    assert bm.num_used == 0 and sorted(bm.free_blocks) == list(range(10)) and bm.peak_used == 5


def test_blocks_needed_counts_growth_and_the_copy():
    bm = BlockManager(8, 4)
    seq = Sequence(0, [1] * 5, max_new_tokens=3)
    assert bm.blocks_needed(seq, 5) == 2
    bm.allocate(seq, 5)
    child = seq.fork(0, 0)
    bm.fork(child)
    assert bm.blocks_needed(child, 9, write_from=5) == 2  # one new block + the copy of block 1
    assert bm.blocks_needed(child, 8) == 0
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)


def _scheduler(num_blocks, block_size=4, budget=64, n=1, lookahead=1, max_seqs=64):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget, lookahead=lookahead, n=n,
                     make_child=lambda p, j: p.fork(j, stream=j)), bm


def _step(sched, token=7):
    batch = sched.schedule()
    decode_out = [[(token, -1.0, None)] * w for w in batch.windows]
    prefill_out = [[[(token, -1.0, None)] for _ in c.samples] for c in batch.prefill]
    sched.postprocess(batch, decode_out, prefill_out, lambda s: None)
    return batch


def test_chunked_prefill_respects_the_token_budget_and_mixes_with_decode():
    sched, bm = _scheduler(40, budget=10)
    sched.add(Sequence(0, [1] * 4, max_new_tokens=3))
    sched.add(Sequence(1, [1] * 23, max_new_tokens=3))
    first = _step(sched)
    assert [(c.start, c.end) for c in first.prefill] == [(0, 4), (0, 6)]
    second = _step(sched)
    assert len(second.decode) == 1 and [(c.start, c.end) for c in second.prefill] == [(6, 15)]  # 1 + 9 = budget
    third = _step(sched)
    assert [(c.start, c.end) for c in third.prefill] == [(15, 23)] and third.prefill[0].completes
    while not sched.done:
        _step(sched)
    assert sorted(s.num_completion for s in sched.finished) == [3, 3]
    assert all(s.finish_reason == "length" for s in sched.finished) and bm.num_used == 0


def test_a_full_pool_preempts_the_newest_and_recomputes_it():
    sched, bm = _scheduler(5, block_size=2)
    for i in range(3):
        sched.add(Sequence(i, [1, 2, 3], max_new_tokens=4))
    while not sched.done:
        _step(sched)
    assert sched.num_preemptions > 0
    assert sorted(s.prompt_index for s in sched.finished) == [0, 1, 2]
    assert all(s.num_completion == 4 and s.status is Status.FINISHED for s in sched.finished)
    assert bm.num_used == 0 and bm.peak_used <= 5


def test_decode_windows_are_capped_by_the_remaining_tokens():
    sched, _ = _scheduler(20, lookahead=4)
    sched.add(Sequence(0, [1, 2], max_new_tokens=6))
    _step(sched)  # prefill + first token
    batch = _step(sched)
    assert batch.windows == [4]
    batch = _step(sched)
    assert batch.windows == [1] and sched.done


def test_a_pool_too_small_for_one_sequence_raises():
    sched, _ = _scheduler(1, block_size=2)
    sched.add(Sequence(0, [1, 2, 3], max_new_tokens=2))
    with pytest.raises(RuntimeError, match="cannot hold one sequence"):
        for _ in range(4):
            _step(sched)


@pytest.mark.parametrize("reuse", [True, False])
def test_a_preempted_sample_reuses_its_groups_prompt_blocks(reuse):
    # an 8-token prompt (4 full blocks of 2) with 3 samples of 6 tokens: 4 + 3 * 3 = 13 blocks at the end,
    # so a 9-block pool preempts samples while their siblings still hold the prompt's blocks
    sched, bm = _scheduler(9, block_size=2, n=3)
    sched.reuse_prefix = reuse
    sched.add(Sequence(0, list(range(8)), max_new_tokens=6))
    while not sched.done:
        _step(sched)
    assert sched.num_preemptions > 0 and len(sched.preempted) == sched.num_preemptions
    assert sorted(s.sample_index for s in sched.finished) == [0, 1, 2]
    assert all(s.num_completion == 6 and s.token_ids[:8] == list(range(8)) for s in sched.finished)
    recompute = sum(tokens for tokens, _ in sched.preempted)
    kept = [k for _, k in sched.preempted]
    if reuse:  # every preempted sample had a running sibling: its whole prompt (8 positions) was a hit
        assert kept == [8] * len(kept)
        assert sched.num_prefilled == 8 + recompute - 8 * len(kept)
    else:
        assert kept == [0] * len(kept) and sched.num_prefilled == 8 + recompute
    assert bm.num_used == 0 and all(r == 0 for r in bm.ref_counts)


def test_preemption_keeps_only_full_shared_blocks():
    bm = BlockManager(12, 4)
    prompt = Sequence(0, list(range(10)), max_new_tokens=4)  # blocks: full, full, partial (2 of 4)
    bm.allocate(prompt, 10)
    a, b = prompt.fork(0, 0), prompt.fork(1, 1)
    for c in (a, b):
        bm.fork(c)
    bm.free(prompt)
    for c in (a, b):
        c.append(5, -1.0)
        c.num_cached = 10
    assert bm.make_writable(a, 10) is not None  # a writes into its own copy of the partial block
    bm.allocate(a, 11)
    assert bm.free_after_shared_prefix(a) == 8 and a.block_table == b.block_table[:2] and a.num_cached == 8
    assert bm.ref_counts[b.block_table[0]] == 2 and bm.ref_counts[b.block_table[2]] == 1
    bm.free(b)  # now a alone holds blocks 0-1: a second preemption of a frees them (nothing shared)
    assert bm.free_after_shared_prefix(a) == 0 and a.block_table == [] and bm.num_used == 0
