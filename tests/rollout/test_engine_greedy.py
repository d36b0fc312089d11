"""Greedy decoding of the native engine is token-identical to the HF model's own argmax loop."""
import random

import pytest
import torch

from fusedrl.rollout.native import EngineConfig, NativeEngine
from fusedrl.rollout.sampling import SamplingParams

from ._tiny import hf_greedy, random_prompts, tiny_model

NEW = 10
PROMPTS = random_prompts(32, 1, 40, seed=5)


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3", "mistral"])
def model_and_ref(request):
    model = tiny_model(request.param, seed=1)
    return model, [hf_greedy(model, p, NEW) for p in PROMPTS]


def _run(model, prompts, **config):
    engine = NativeEngine(model, config=EngineConfig(**config))
    groups = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=NEW))
    return [g[0].token_ids for g in groups], engine


# (block size, token budget, decode steps per sync, arrival order)
SETTINGS = [(16, 4096, 1, "given"), (4, 23, 1, "reversed"), (1, 64, 3, "shuffled"), (7, 9, 4, "given")]


@pytest.mark.parametrize("block_size, budget, sync_every, order", SETTINGS)
def test_greedy_matches_hf(model_and_ref, block_size, budget, sync_every, order):
    model, ref = model_and_ref
    index = list(range(len(PROMPTS)))
    if order == "reversed":
        index.reverse()
    elif order == "shuffled":
        random.Random(0).shuffle(index)
    got, engine = _run(model, [PROMPTS[i] for i in index], block_size=block_size, max_num_batched_tokens=budget,
                       sync_every=sync_every)
    for pos, i in enumerate(index):
        assert got[pos] == ref[i], f"prompt {i} (len {len(PROMPTS[i])}): {got[pos]} != {ref[i]}"
    if budget < 40:  # prompts longer than the budget were prefilled in chunks
        assert engine.stats["steps"] > NEW


def test_forced_preemption_gives_the_same_greedy_outputs(model_and_ref):
    model, ref = model_and_ref
    got, engine = _run(model, PROMPTS, block_size=4, num_blocks=24, max_num_batched_tokens=64)
    assert engine.stats["preemptions"] > 0
    assert engine.stats["peak_blocks"] <= 24
    assert got == ref


def test_multi_step_window_stops_at_stop_tokens(model_and_ref):
    model, ref = model_and_ref
    stop = ref[0][3]
    engine = NativeEngine(model, config=EngineConfig(block_size=4, sync_every=5))
    groups = engine.generate(PROMPTS[:8], SamplingParams(temperature=0.0, max_new_tokens=NEW, stop_token_ids=(stop,)))
    for i, group in enumerate(groups):
        want = ref[i][: ref[i].index(stop) + 1] if stop in ref[i] else ref[i]
        assert group[0].token_ids == want
        assert group[0].finish_reason == ("stop" if stop in want else "length")
