"""Cascade decode attention (a group's shared prompt pages once per group) vs the per-row exact path."""
import random

import pytest
import torch

from fusedrl.kernels.decode_attention import paged_decode_attention_reference
from fusedrl.rollout.native import EngineConfig, NativeEngine
from fusedrl.rollout.native.cascade import cascade_decode_attention, plan_cascade
from fusedrl.rollout.sampling import SamplingParams

from ._tiny import random_prompts, tiny_model


def _layout(seed, block_size, group_sizes, max_prefix_pages=4, max_own=9):
    """Block tables of groups sharing their first pages (a sample may have diverged: its own copies)."""
    rnd = random.Random(seed)
    tables, groups, prompt_pages, lens, next_page = [], [], [], [], 0
    first_shared = next(g for g, size in enumerate(group_sizes) if size > 1)
    for g, size in enumerate(group_sizes):
        shared_pages = rnd.randint(1 if g == first_shared else 0, max_prefix_pages)
        prompt_len = shared_pages * block_size + rnd.randint(0, block_size - 1)
        shared = list(range(next_page, next_page + shared_pages))
        next_page += shared_pages
        for j in range(size):
            context = prompt_len + rnd.randint(1, max_own)
            own = list(range(next_page, next_page + -(-context // block_size) - shared_pages))
            next_page += len(own)
            table = shared + own
            if j > 1 and rnd.random() < 0.25 and shared:  # a re-prefilled sample holding private copies
                table = list(range(next_page, next_page + len(shared))) + own
                next_page += len(shared)
            tables.append(table)
            groups.append(g)
            prompt_pages.append(prompt_len // block_size)
            lens.append(context)
    return tables, groups, prompt_pages, lens, next_page


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("seed, kv_heads, group, head_dim, block_size, sizes", [
    (0, 1, 1, 8, 4, [3, 1, 5]), (1, 2, 3, 12, 3, [2, 2, 1, 4]), (2, 3, 2, 24, 7, [6]),
    (3, 2, 4, 16, 16, [8, 8, 1]), (4, 1, 5, 20, 5, [1, 3, 2, 2, 7])])
def test_cascade_matches_the_per_row_path(seed, kv_heads, group, head_dim, block_size, sizes, dtype, atol):
    tables, groups, prompt_pages, lens, pages = _layout(seed, block_size, sizes)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(pages + 1, block_size, kv_heads, head_dim, generator=g, dtype=dtype)
    v = torch.randn(pages + 1, block_size, kv_heads, head_dim, generator=g, dtype=dtype)
    q = torch.randn(len(tables), kv_heads * group, head_dim, generator=g, dtype=dtype)
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    context = torch.tensor(lens, dtype=torch.int32)
    plan = plan_cascade(tables, groups, prompt_pages, block_size, "cpu")
    assert plan is not None
    scale = head_dim ** -0.5
    want = paged_decode_attention_reference(q, k, v, block_tables, context, scale)
    got = cascade_decode_attention(q, k, v, plan, context, scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_plan_shares_only_common_full_prompt_pages():
    tables = [[0, 1, 2, 5], [0, 1, 3, 6], [0, 4, 7], [8, 9], [10, 11]]
    plan = plan_cascade(tables, [0, 0, 0, 1, 2], [3, 3, 3, 1, 1], 4, "cpu")
    assert plan.members.tolist() == [[0, 1, 2]] and plan.prefix_pages.tolist() == [[0]]
    assert plan.prefix_lens.tolist() == [4] and plan.row_prefix.tolist() == [4, 4, 4, 0, 0]
    assert plan.suffix_tables.tolist() == [[1, 2, 5], [1, 3, 6], [4, 7, 0], [8, 9, 0], [10, 11, 0]]
    # the prompt-page cap: pages past the prompt's full pages are never shared
    capped = plan_cascade([[0, 1, 2], [0, 1, 3]], [0, 0], [1, 1], 4, "cpu")
    assert capped.prefix_pages.tolist() == [[0]]
    assert plan_cascade([[0, 1], [2, 3]], [0, 0], [2, 2], 4, "cpu") is None  # nothing shared
    assert plan_cascade([[0, 1], [0, 1]], [0, 1], [2, 2], 4, "cpu") is None  # different groups


def test_engine_with_and_without_cascade_agree():
    model = tiny_model("qwen2", seed=4)
    prompts = random_prompts(5, 9, 40, seed=6)
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=10, seed=2, logprobs_topk=2)
    runs = []
    for cascade in (True, False):
        engine = NativeEngine(model, config=EngineConfig(block_size=4, max_num_batched_tokens=48))
        engine.runner.use_cascade = cascade
        plans, real = [], engine.runner._cascade
        engine.runner._cascade = lambda seqs: plans.append(real(seqs)) or plans[-1]
        runs.append(engine.generate(prompts, params))
        assert any(p is not None for p in plans) == cascade
    for g, h in zip(*runs):
        for a, b in zip(g, h):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
