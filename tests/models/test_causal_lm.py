"""Models on packed batches: packed == per-sequence unpadded forward (and backward), LM head, save/load."""
import os
import random

import pytest
import torch

from fusedrl.data.batch import IGNORE_INDEX
from fusedrl.data.records import Example, pack_examples
from fusedrl.models.causal_lm import build_model, hidden_states, lm_head, resolve_dtype, save_model
from tests.conftest import assert_close

TINY = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 61, "max_position_embeddings": 64}


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(config={**TINY, **overrides})


def packed_batch(lengths, vocab=61, seed=0):
    rng = random.Random(seed)
    examples = [Example(ids := [rng.randrange(vocab) for _ in range(n)], list(ids)) for n in lengths]
    (batch,) = pack_examples(examples, sum(lengths))
    return batch


def reference_hidden(model, batch):
    """Each document alone, unpadded, through the stock sdpa attention."""
    model.set_attn_implementation("sdpa")
    outs = []
    bounds = batch.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        outs.append(model.model(input_ids=batch.input_ids[None, start:end]).last_hidden_state[0])
    return torch.cat(outs)


@pytest.mark.parametrize("overrides", [{}, {"model_type": "llama", "tie_word_embeddings": True}])
def test_packed_equals_per_sequence_forward_and_backward(overrides):
    model = tiny_model(**overrides)
    batch = packed_batch([7, 1, 12, 5])
    upstream = torch.randn(batch.total, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))

    packed = hidden_states(model, batch)
    assert packed.shape == (batch.total, TINY["hidden_size"]) and packed.dtype == torch.float32
    (packed * upstream).sum().backward()
    # The LM head is not applied, so (untied) it gets no gradient; everything else must.
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(packed_grads) >= len(list(model.parameters())) - 1
    model.zero_grad()

    expected = reference_hidden(model, batch)
    (expected * upstream).sum().backward()
    assert_close(packed, expected, atol=2e-5, rtol=1e-4, name="hidden")
    for name, param in model.named_parameters():
        if name not in packed_grads:
            assert param.grad is None, name
            continue
        assert_close(packed_grads[name], param.grad, atol=2e-5, rtol=1e-4, name=f"grad {name}")


def test_gradient_checkpointing_matches():
    batch = packed_batch([9, 4, 6], seed=1)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(config=TINY, gradient_checkpointing=checkpointing)
        assert getattr(model, "is_activation_checkpointing", None) == checkpointing
        hidden_states(model, batch).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for plain, recomputed in zip(*grads):
        assert_close(recomputed, plain, name="checkpointed grad")


def test_documents_do_not_see_each_other():
    model = tiny_model()
    batch = packed_batch([6, 8], seed=2)
    before = hidden_states(model, batch)
    batch.input_ids[:6] = (batch.input_ids[:6] + 1) % TINY["vocab_size"]  # change the first document only
    after = hidden_states(model, batch)
    assert not torch.allclose(before[:6], after[:6])
    assert_close(after[6:], before[6:], name="second document")


def test_lm_head():
    model = tiny_model()
    weight, bias = lm_head(model)
    assert weight.shape == (TINY["vocab_size"], TINY["hidden_size"]) and bias is None
    batch = packed_batch([5, 3])
    logits = model(input_ids=batch.input_ids[None, :5]).logits[0]
    model_hidden = hidden_states(model, packed_batch([5]))
    assert_close(model_hidden @ weight.T, logits, name="head(hidden) vs logits")
    tied = tiny_model(model_type="llama", tie_word_embeddings=True)
    assert lm_head(tied)[0] is tied.get_input_embeddings().weight


def test_save_and_load_round_trip(tmp_path):
    from fusedrl.data.tokenizer import build_char_tokenizer

    model = tiny_model(seed=5)
    batch = packed_batch([4, 9])
    hidden_states(model, batch)  # leaves the model on the varlen attention; must not leak into the save
    save_model(model, tmp_path / "ckpt", tokenizer=build_char_tokenizer())
    files = os.listdir(tmp_path / "ckpt")
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    loaded = build_model(name_or_path=str(tmp_path / "ckpt"))
    assert loaded.config._attn_implementation == "sdpa"
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    assert torch.equal(hidden_states(loaded, batch), hidden_states(model, batch))


def test_bad_arguments():
    with pytest.raises(ValueError, match="pass exactly one of name_or_path and config"):
        build_model()
    with pytest.raises(ValueError, match="config: expected a dict with a 'model_type' string"):
        build_model(config={"hidden_size": 8})
    with pytest.raises(ValueError, match="dtype: expected a torch.dtype or one of"):
        resolve_dtype("float8", torch.device("cpu"))
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    model = tiny_model()
    with pytest.raises(TypeError, match="batch: expected a PackedBatch"):
        hidden_states(model, torch.zeros(3, dtype=torch.long))
    batch = packed_batch([3])
    batch.labels[:] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"batch: is on meta but the model is on cpu"):
        hidden_states(model, batch.to("meta"))
