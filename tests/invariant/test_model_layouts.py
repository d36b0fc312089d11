"""Whole tiny models in invariant mode: a token's log-prob / entropy is bitwise the same in any pack
layout, micro-batch split or padding, and the native engine's sampled log-probs are the trainer's
recompute (token_logprobs, the RL stages' old-logprob path) to the bit, in float32 and bfloat16."""
import random

import pytest
import torch

from fusedrl.data.batch import PackedBatch
from fusedrl.kernels.invariant import invariant
from fusedrl.models.causal_lm import token_logprobs
from fusedrl.rollout.native import EngineConfig, NativeEngine
from fusedrl.rollout.sampling import SamplingParams
from tests.rollout._tiny import random_prompts, tiny_model


def _batch(docs, pad: int = 0) -> PackedBatch:
    """Pack documents (every next token trained); `pad` trailing padding tokens as their own document."""
    ids, labels, pos, cu = [], [], [], [0]
    for doc in docs:
        ids += doc
        labels += doc[1:] + [-100]
        pos += list(range(len(doc)))
        cu.append(cu[-1] + len(doc))
    if pad:
        ids, labels, pos = ids + [0] * pad, labels + [-100] * pad, pos + list(range(pad))
        cu.append(cu[-1] + pad)
    return PackedBatch(input_ids=torch.tensor(ids), labels=torch.tensor(labels), position_ids=torch.tensor(pos),
                       cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(len(d) for d in docs),
                       num_tokens=sum(len(d) - 1 for d in docs))


def _per_doc(model, docs, order, sizes, pad=0):
    out, k = {}, 0
    for size in sizes:
        chunk = order[k:k + size]
        k += size
        batch = _batch([docs[i] for i in chunk], pad)
        with torch.no_grad():
            logp, ent = token_logprobs(model, batch, temperature=0.9, return_entropy=True)
        starts = batch.cu_seqlens.tolist()
        for j, i in enumerate(chunk):
            out[i] = (logp[starts[j]:starts[j + 1]], ent[starts[j]:starts[j + 1]])
    return out


def _layouts(n, count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        order = list(range(n))
        rng.shuffle(order)
        sizes, left = [], n
        while left:
            sizes.append(rng.randint(1, left))
            left -= sizes[-1]
        yield order, sizes


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_twenty_sequences_any_layout_bitwise(family):
    model = tiny_model(family, seed=1)
    docs = random_prompts(20, 1, 45, seed=4)
    with invariant():
        base = _per_doc(model, docs, list(range(20)), [20])
        runs = [_per_doc(model, docs, o, s) for o, s in _layouts(20, 2, seed=1)]
        runs.append(_per_doc(model, docs, list(range(20)), [7, 13], pad=11))  # padded packs
        runs.append({i: _per_doc(model, docs, [i], [1])[i] for i in (0, 9, 19)})  # alone
    for got in runs:
        for i, (logp, ent) in got.items():
            assert torch.equal(logp, base[i][0]) and torch.equal(ent, base[i][1]), (family, i)
    # the invariant forward is the model's forward: within float32 tolerance of the default path
    default = _per_doc(model, docs, list(range(20)), [20])
    for i in range(20):
        torch.testing.assert_close(default[i][0], base[i][0], atol=1e-4, rtol=1e-4)


def _sampler_vs_trainer(model, params, dtype):
    prompts = random_prompts(5, 2, 25, seed=2)
    engine = NativeEngine(model, config=EngineConfig(block_size=4, max_num_batched_tokens=17, sync_every=3))
    groups = engine.generate(prompts, params)
    docs, sampled = [], []
    for prompt, group in zip(prompts, groups):
        for c in group:
            docs.append(prompt + c.token_ids)
            sampled.append(torch.tensor(c.logprobs, dtype=torch.float32))
    batch = _batch(docs)
    starts = batch.cu_seqlens.tolist()
    with torch.no_grad():
        logp = token_logprobs(model, batch, temperature=params.temperature if params.temperature > 0 else 1.0)
    recomputed = []
    for j, (doc, lp) in enumerate(zip(docs, sampled)):
        end = starts[j + 1] - 1
        recomputed.append(logp[end - len(lp):end].float())
    return torch.cat(sampled), torch.cat(recomputed)


@pytest.mark.parametrize("family,dtype", [("qwen2", torch.float32), ("llama", torch.float32),
                                          ("qwen3", torch.float32), ("qwen2", torch.bfloat16)])
def test_sampler_logprobs_equal_the_trainer_recompute_bitwise(family, dtype):
    model = tiny_model(family, seed=3).to(dtype)
    params = SamplingParams(n=2, temperature=0.7, top_k=20, max_new_tokens=9, seed=3)
    with invariant():
        sampler, trainer = _sampler_vs_trainer(model, params, dtype)
    assert sampler.numel() > 20
    assert torch.equal(sampler, trainer), (sampler - trainer).abs().max()
    # the ratio is exactly 1 and so is any truncated IS weight
    assert torch.equal(torch.exp(trainer - sampler), torch.ones_like(sampler))


def test_default_mode_sampler_is_within_its_tolerance():
    model = tiny_model("qwen2", seed=3)
    params = SamplingParams(n=2, temperature=0.7, top_k=20, max_new_tokens=9, seed=3)
    sampler, trainer = _sampler_vs_trainer(model, params, torch.float32)
    torch.testing.assert_close(sampler, trainer, atol=1e-5, rtol=0)
