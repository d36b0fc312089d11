"""Generation: KV-cached batched decoding equals step-by-step full forwards; EOS, stop strings, log-probs, seeds."""
import pytest
import torch

from fusedrl.rollout.hf import generate, sample_next
from fusedrl.models.causal_lm import build_model
from tests.conftest import assert_close

VOCAB = 61
# A larger init than the default gives peaked logits, so greedy choices are never near-ties.
TINY = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "max_position_embeddings": 128, "initializer_range": 0.3}
PROMPTS = [[1, 5, 9, 13, 17, 21, 25, 29, 33], [7], [40, 41, 42], [3, 3, 3, 3, 3, 3]]


def tiny_model(seed=0, attn="sdpa", **overrides):
    torch.manual_seed(seed)
    return build_model(config={**TINY, **overrides}, attn_implementation=attn)


@torch.no_grad()
def full_forward_logits(model, prompt, completion):
    """(len(completion), V) next-token logits at each completion position, from one uncached forward."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(completion)].float()


@torch.no_grad()
def greedy_without_cache(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("variant", ["sdpa", "eager", "sliding_window"])
def test_greedy_with_cache_equals_step_by_step(variant):
    if variant == "sliding_window":  # the 2-D mask path; window smaller than prompt + completion
        model = tiny_model(model_type="mistral", sliding_window=5, head_dim=8)
    else:
        model = tiny_model(attn=variant)
    model.eval()
    out = generate(model, PROMPTS, max_new_tokens=12, greedy=True)
    for prompt, tokens, logp in zip(PROMPTS, out.tokens, out.logprobs):
        assert tokens == greedy_without_cache(model, prompt, 12)
        expected = torch.log_softmax(full_forward_logits(model, prompt, tokens), -1)
        assert_close(torch.tensor(logp), expected.gather(1, torch.tensor(tokens)[:, None])[:, 0],
                     atol=1e-4, rtol=1e-4, name="greedy logprobs")
    assert out.finished == [False] * len(PROMPTS)


def test_eos_stops_and_is_kept():
    model = tiny_model()
    free = generate(model, PROMPTS, max_new_tokens=10, greedy=True)
    eos = free.tokens[0][3]  # a token row 0 produces at step 3
    out = generate(model, PROMPTS, max_new_tokens=10, greedy=True, eos_token_id=eos)
    for row, tokens in zip(free.tokens, out.tokens):
        if eos in row:
            cut = row.index(eos) + 1
            assert tokens == row[:cut]
        else:
            assert tokens == row
    assert out.finished == [eos in row for row in free.tokens]
    assert out.finished[0] and len(out.tokens[0]) <= 4
    assert all(len(t) == len(lp) for t, lp in zip(out.tokens, out.logprobs))
    # Every row hitting EOS at step 0 stops the loop at once.
    first = {row[0] for row in free.tokens}
    stopped = generate(model, PROMPTS, max_new_tokens=10, greedy=True, eos_token_id=sorted(first))
    assert stopped.tokens == [[row[0]] for row in free.tokens] and all(stopped.finished)


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5)])
def test_sampled_logprobs_equal_full_forward(temperature, top_p, top_k):
    model = tiny_model(seed=1)
    gen = torch.Generator().manual_seed(11)
    out = generate(model, PROMPTS, max_new_tokens=9, temperature=temperature, top_p=top_p, top_k=top_k,
                   generator=gen)
    for prompt, tokens, logp in zip(PROMPTS, out.tokens, out.logprobs):
        assert len(tokens) == 9
        logits = full_forward_logits(model, prompt, tokens)
        index = torch.tensor(tokens)[:, None]
        expected = torch.log_softmax(logits / temperature, -1).gather(1, index)[:, 0]
        assert_close(torch.tensor(logp), expected, atol=1e-4, rtol=1e-4, name="sampled logprobs")
        if top_k:  # every sampled token is among the k most likely
            rank = (logits > logits.gather(1, index)).sum(-1)
            assert (rank < top_k).all()
        if top_p < 1:  # ... and inside the nucleus: the mass strictly above it is below top_p
            probs = torch.softmax(logits / temperature, -1)
            above = (probs * (probs > probs.gather(1, index))).sum(-1)
            assert (above < top_p).all()


def test_top_k_one_equals_greedy_and_seeds_reproduce():
    model = tiny_model(seed=2)
    greedy = generate(model, PROMPTS, max_new_tokens=8, greedy=True)
    top1 = generate(model, PROMPTS, max_new_tokens=8, top_k=1, temperature=0.9,
                    generator=torch.Generator().manual_seed(0))
    assert top1.tokens == greedy.tokens

    def sample(seed):
        return generate(model, PROMPTS, max_new_tokens=8, temperature=1.5, generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(5), sample(5), sample(6)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens


def test_stop_strings_with_char_tokenizer():
    from fusedrl.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("abcdefgh")
    model = tiny_model(seed=3, vocab_size=len(tok))
    prompts = [tok.encode("ab", add_special_tokens=False), tok.encode("hgf", add_special_tokens=False)]
    free = generate(model, prompts, max_new_tokens=16, greedy=True, eos_token_id=[])
    text = tok.decode(free.tokens[0], skip_special_tokens=False)
    stop = text[5:7]  # a two-character string the first row produces
    out = generate(model, prompts, max_new_tokens=16, greedy=True, eos_token_id=[], stop_strings=[stop],
                   tokenizer=tok)
    first = tok.decode(out.tokens[0], skip_special_tokens=False)
    assert first.endswith(stop) and stop not in first[:-1] and text.startswith(first)
    assert out.finished[0]
    other = tok.decode(free.tokens[1], skip_special_tokens=False)
    assert out.finished[1] == (stop in other)


@pytest.mark.parametrize("overrides", [{}, {"model_type": "mistral", "sliding_window": 5, "head_dim": 8}])
def test_generation_on_the_packed_attention_equals_sdpa_without_switching(overrides, monkeypatch):
    """The trainer leaves the model on "fusedrl_varlen"; generation runs on it as is, like SDPA, warning-free."""
    import warnings

    from fusedrl.models.packed_attention import register_varlen_attention

    model = tiny_model(**overrides)
    model.eval()
    expected = generate(model, PROMPTS, max_new_tokens=12, greedy=True)
    model.set_attn_implementation(register_varlen_attention())
    switches = []
    monkeypatch.setattr(type(model), "set_attn_implementation", lambda self, name: switches.append(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated transformers path (past_key_values), no other warning
        out = generate(model, PROMPTS, max_new_tokens=12, greedy=True)
    assert out.tokens == expected.tokens and out.finished == expected.finished
    for got, want in zip(out.logprobs, expected.logprobs):
        assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5, name="logprobs")
    assert switches == [] and model.config._attn_implementation == "fusedrl_varlen"


def test_unsupported_attention_is_named():
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="model: cached generation runs on the attention implementations"):
        generate(model, PROMPTS, max_new_tokens=2, greedy=True)


def test_model_state_is_restored():
    from fusedrl.data.records import Example, pack_examples
    from fusedrl.models.causal_lm import hidden_states

    model = tiny_model()
    (batch,) = pack_examples([Example([1, 2, 3], [1, 2, 3])], 8)
    hidden_states(model, batch)  # switches to the varlen attention
    impl = model.config._attn_implementation
    model.train()
    generate(model, PROMPTS, max_new_tokens=3, greedy=True)
    assert model.config._attn_implementation == impl and model.training


def test_sample_next_top_p_keeps_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps the first two (0.5 < 0.75 <= 0.8).
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    tokens, logp = sample_next(logits, temperature=1.0, top_p=0.75, top_k=0, greedy=False,
                               generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}
    share = (tokens == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05  # renormalised inside the nucleus
    assert_close(logp, torch.log(torch.tensor([0.5, 0.3]))[tokens], name="policy logp")


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompts: expected a non-empty list"):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a non-empty list of token ids"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens: expected an int >= 1, got 0"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature: expected a number > 0"):
        generate(model, [[1]], max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p: expected a number in \(0, 1\], got 1.5"):
        generate(model, [[1]], max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match="top_k: expected an int >= 0"):
        generate(model, [[1]], max_new_tokens=2, top_k=-1)
    with pytest.raises(ValueError, match="stop_strings: need a tokenizer"):
        generate(model, [[1]], max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(ValueError, match="eos_token_id: expected an int or a list of ints"):
        generate(model, [[1]], max_new_tokens=2, eos_token_id=["a"])
