"""A rollout sampled in shares (one per rank) equals the rollout sampled at once: first_index, rank_prompts."""
import dataclasses

import pytest
import torch

from fusedrl.rollout.completions import make_sampler, rank_prompts, sample_rollout, sample_rollout_divided
from fusedrl.rollout.experience import Rollout
from fusedrl.rollout.native import NativeEngine
from fusedrl.rollout.sampling import SamplingParams
from tests.helpers import rl_tiny as T

from ._tiny import random_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=5)


@pytest.mark.parametrize("k", [1, 3])
def test_sampling_prompts_k_to_n_with_first_index_k_is_the_tail_of_sampling_all(model, k):
    prompts = random_prompts(5, 2, 20, seed=4)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=21)
    whole = NativeEngine(model).generate(prompts, params)
    tail = NativeEngine(model).generate(prompts[k:], dataclasses.replace(params, first_index=k))
    head = NativeEngine(model).generate(prompts[:k], params)
    assert len({tuple(c.token_ids) for g in whole for c in g}) > 5  # real sampling, not one repeated string
    for got, want in zip(head + tail, whole):
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        for a, b in zip(got, want):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    # without the offset the tail's prompts would draw prompt 0.. streams: other completions
    unshifted = NativeEngine(model).generate(prompts[k:], params)
    assert [[c.token_ids for c in g] for g in unshifted] != [[c.token_ids for c in g] for g in tail]


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_each_rank_share_advances_the_stage_stream_alike(backend):
    """Ranks draw one seed per call from the same stream state, whatever their share (even empty)."""
    tok = T.tokenizer()
    policy = T.tiny_policy(tok)
    params = SamplingParams(n=2, max_new_tokens=4)
    streams = [torch.Generator().manual_seed(9) for _ in range(3)]
    samplers = [make_sampler(backend, policy, tok, generator=g) for g in streams]
    whole = sample_rollout(samplers[0], tok, T.records(), [0, 1, 2, 3], params)
    part = sample_rollout(samplers[1], tok, T.records(), [2, 3], dataclasses.replace(params, first_index=2))
    assert samplers[2].generate([], params) == []
    states = [g.get_state() for g in streams]
    assert torch.equal(states[0], states[1]) and torch.equal(states[0], states[2])
    if backend == "native":  # the native engine's shares are exact
        assert part.completion_ids == whole.completion_ids[4:]


def test_rank_prompts_divides_contiguously_and_evenly():
    for n in range(0, 12):
        for world in range(1, 6):
            shares = [rank_prompts(n, r, world) for r in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            sizes = [hi - lo for lo, hi in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="rank"):
        rank_prompts(4, 2, 2)


def test_without_a_process_group_divided_is_sample_then_score():
    tok = T.tokenizer()
    policy = T.tiny_policy(tok)
    params = SamplingParams(n=2, max_new_tokens=4, seed=3)
    scored = []

    def score(part):
        scored.append(len(part))
        part.rewards = torch.arange(len(part), dtype=torch.float32)

    got, mine = sample_rollout_divided(make_sampler("native", policy, tok), tok, T.records(), [1, 5, 6], params, score)
    want = sample_rollout(make_sampler("native", policy, tok), tok, T.records(), [1, 5, 6], params)
    assert mine == 3 and scored == [6] and got.completion_ids == want.completion_ids
    assert torch.equal(got.rewards, torch.arange(6.0))


def test_concat_skips_empty_shares():
    full = Rollout([[1]] * 2, [[2], [3]], [[-0.1], [-0.2]], [True, False], [0, 0], ["x", "y"], 2,
                   torch.tensor([1.0, 2.0]), None)
    empty = Rollout([], [], [], [], [], [], 2)
    out = Rollout.concat([full, empty, full])
    assert out.completion_ids == [[2], [3], [2], [3]] and torch.equal(out.rewards, torch.tensor([1.0, 2.0] * 2))
    assert out.accuracy is None
