"""The native engine end to end: seeds, log-probs vs the trainer, prefix sharing, weights in place, stops."""
import pytest
import torch

from fusedrl.kernels import linear_logprobs
from fusedrl.rollout.native import EngineConfig, NativeEngine, UnsupportedModelError
from fusedrl.rollout.sampling import Completion, SamplingParams

from ._tiny import VOCAB, hf_greedy, random_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=3)


def test_same_seed_same_completion_whatever_else_is_in_the_batch(model):
    prompts = random_prompts(6, 3, 30, seed=1)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=11)
    small = NativeEngine(model, config=EngineConfig(block_size=16)).generate(prompts[:2], params)
    big = NativeEngine(model, config=EngineConfig(block_size=4, max_num_batched_tokens=17, sync_every=3)).generate(
        prompts, params)
    for i in range(2):
        for j in range(3):
            assert big[i][j].token_ids == small[i][j].token_ids
            torch.testing.assert_close(torch.tensor(big[i][j].logprobs), torch.tensor(small[i][j].logprobs),
                                       atol=1e-5, rtol=0)
    assert len({tuple(c.token_ids) for c in big[0]}) > 1, "the n samples of a group must differ"
    other = NativeEngine(model).generate(prompts[:2], SamplingParams(n=3, temperature=1.0, top_p=0.95,
                                                                    max_new_tokens=12, seed=12))
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in small[0]]


def test_sampler_logprobs_match_linear_logprobs_recompute(model):
    prompts = random_prompts(5, 2, 25, seed=2)
    params = SamplingParams(n=2, temperature=0.7, top_k=20, max_new_tokens=9, seed=3)
    groups = NativeEngine(model, config=EngineConfig(block_size=8)).generate(prompts, params)
    head = model.get_output_embeddings().weight
    for prompt, group in zip(prompts, groups):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                hidden = model.model(ids).last_hidden_state[0]
            n = len(prompt)
            want = linear_logprobs(hidden[n - 1:-1], head, torch.tensor(c.token_ids), temperature=0.7)
            torch.testing.assert_close(torch.tensor(c.logprobs), want.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt_len", [21, 24])
def test_n_samples_share_the_prompt_blocks(model, prompt_len):
    block, new, n = 4, 10, 8
    prompt = random_prompts(1, prompt_len, prompt_len, seed=4)[0]
    engine = NativeEngine(model, config=EngineConfig(block_size=block, sync_every=1))
    seen = []
    original = engine.runner.run_mixed

    def spy(batch, sampler):  # count the distinct blocks referenced by the running samples at each step
        tables = [s.block_table for s in batch.decode]
        if len(tables) == n:
            seen.append((len({b for t in tables for b in t}), engine.block_manager.num_used,
                         [t[: prompt_len // block] for t in tables]))
        return original(batch, sampler)

    engine.runner.run_mixed = spy
    groups = engine.generate([prompt], SamplingParams(n=n, temperature=1.0, max_new_tokens=new, seed=0))
    assert all(len(c.token_ids) == new for c in groups[0])
    shared = prompt_len // block
    own = -(-(prompt_len + new - 1) // block) - shared  # blocks of each sample past the shared full prompt blocks
    distinct, used, prefixes = seen[-1]  # the last step: every sample holds all its cached tokens
    assert distinct == used == shared + n * own
    assert engine.stats["peak_blocks"] == shared + n * own
    assert all(p == prefixes[0] for p in prefixes)  # the full prompt blocks are the same pages
    assert shared + n * own < n * -(-(prompt_len + new - 1) // block)  # less than without sharing


def test_an_optimizer_step_changes_the_next_generation_with_no_copy():
    model = tiny_model("llama", seed=4)
    engine = NativeEngine(model)
    prompts = random_prompts(4, 3, 12, seed=6)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = [g[0].token_ids for g in engine.generate(prompts, params)]
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    ids = torch.tensor([prompts[0] + before[0]])
    loss = -torch.log_softmax(model(ids).logits[0, :-1], -1)[:, 1].mean()  # push every position towards token 1
    loss.backward()
    opt.step()
    after = [g[0].token_ids for g in engine.generate(prompts, params)]
    assert after != before
    assert after == [hf_greedy(model, p, 8) for p in prompts]
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    engine.sync_weights()  # a no-op, kept for the interface


class CharTokenizer:
    """decode(ids) = one letter per id: enough for stop strings."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_and_stop_tokens(model):
    prompts = random_prompts(4, 5, 20, seed=7)
    ref = [hf_greedy(model, p, 12) for p in prompts]
    tok = CharTokenizer()
    target = tok.decode(ref[0][4:6])
    engine = NativeEngine(model, tokenizer=tok, config=EngineConfig(sync_every=4))
    groups = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12, stop_strings=(target,)))
    for r, g in zip(ref, groups):
        c = g[0]
        if target in tok.decode(r):
            cut = next(k for k in range(1, 13) if target in tok.decode(r[:k]))
            assert c.token_ids == r[:cut] and c.finish_reason == "stop"
        else:
            assert c.token_ids == r and c.finish_reason == "length"
    with pytest.raises(ValueError, match="tokenizer"):
        NativeEngine(model).generate(prompts, SamplingParams(stop_strings=("x",)))


def test_top_k_one_is_greedy_and_completions_are_well_formed(model):
    prompts = random_prompts(3, 2, 9, seed=8)
    ref = [hf_greedy(model, p, 6) for p in prompts]
    groups = NativeEngine(model).generate(prompts, SamplingParams(n=2, temperature=1.0, top_k=1, max_new_tokens=6,
                                                                  logprobs_topk=3))
    for r, g in zip(ref, groups):
        for c in g:
            assert isinstance(c, Completion) and c.token_ids == r and len(c.top_logprobs) == 6
            assert all(len(t) == 3 and t[0][0] == tok for t, tok in zip(c.top_logprobs, r))


def test_sleep_releases_the_pool_and_generate_wakes_it(model):
    engine = NativeEngine(model, config=EngineConfig(num_blocks=40, block_size=4))
    prompts = random_prompts(3, 2, 9, seed=9)
    first = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=5))
    assert engine.runner.kv
    engine.sleep()
    assert not engine.runner.kv
    engine.wake()
    assert engine.runner.num_blocks == 40 and engine.runner.kv  # a fixed-size pool is taken back at once
    again = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=5))
    assert [g[0].token_ids for g in again] == [g[0].token_ids for g in first]


def test_refusals_and_bad_input(model):
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        NativeEngine(gpt2)
    assert issubclass(UnsupportedModelError, NotImplementedError)
    scaled = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="linear"):
        NativeEngine(scaled)
    wrapped = tiny_model("llama")
    wrapped.model.layers[1].mlp.up_proj = torch.nn.Sequential(wrapped.model.layers[1].mlp.up_proj)
    with pytest.raises(UnsupportedModelError, match="up_proj"):
        NativeEngine(wrapped)
    windowed = NativeEngine(tiny_model("mistral", sliding_window=16))
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        windowed.generate([[1] * 10], SamplingParams(max_new_tokens=8))
    engine = NativeEngine(model, config=EngineConfig(num_blocks=2, block_size=4))
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        engine.generate([[1] * 10], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[VOCAB]], SamplingParams())
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate([[1]], {"n": 1})
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)


def test_preempted_samples_reuse_the_groups_prompt_blocks(model):
    """A tiny pool preempts samples while their siblings hold the prompt: the re-prefill skips the prompt's
    full blocks (counted in prefill_tokens) and the completions are those of an unconstrained run."""
    prompts = random_prompts(2, 33, 40, seed=7)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=5)
    free = NativeEngine(model, config=EngineConfig(block_size=4)).generate(prompts, params)
    tight = NativeEngine(model, config=EngineConfig(block_size=4, num_blocks=28, max_num_batched_tokens=64))
    got = tight.generate(prompts, params)
    assert tight.stats["preemptions"] > 0
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in free]
    for g, h in zip(got, free):
        for a, b in zip(g, h):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    # prompts once per group, plus per preemption only what lies past the kept prompt blocks
    st = tight.stats
    assert st["prefix_hit_tokens"] >= 32 and st["prefix_hit_tokens"] % 4 == 0
    assert st["prefill_tokens"] == sum(map(len, prompts)) + st["preempted_tokens"] - st["prefix_hit_tokens"]
