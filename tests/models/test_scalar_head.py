"""Scalar-head model: last-token scores on packed batches, per-token values, save/load round trips."""
import json
import random

import pytest
import torch

from fusedrl.data.records import Example, pack_examples
from fusedrl.models.causal_lm import build_model, save_model
from fusedrl.models.scalar_head import ScalarHeadModel, last_token_index
from tests.conftest import assert_close
from tests.helpers.alignment import one_thread  # noqa: F401 (autouse fixture)

TINY = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 61, "max_position_embeddings": 64}


def tiny_scalar(seed=0, bias=False, **overrides):
    torch.manual_seed(seed)
    return ScalarHeadModel.from_causal_lm(build_model(config={**TINY, **overrides}), bias=bias)


def packed(lengths, seed=0):
    rng = random.Random(seed)
    examples = [Example(ids := [rng.randrange(61) for _ in range(n)], list(ids)) for n in lengths]
    (batch,) = pack_examples(examples, sum(lengths))
    return batch


def per_sequence_scores(model, batch):
    """Each document alone, unpadded, through stock sdpa attention; head read at its last token."""
    model.model.set_attn_implementation("sdpa")
    bounds = batch.cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        hidden = model.model(input_ids=batch.input_ids[None, start:end]).last_hidden_state[0]
        outs.append(model.head(hidden))
    return torch.cat(outs)  # (total,)


@pytest.mark.parametrize("overrides", [{}, {"model_type": "llama", "tie_word_embeddings": True}])
def test_scores_read_last_token_of_each_packed_sequence(overrides):
    model = tiny_scalar(bias=True, **overrides).eval()
    batch = packed([5, 1, 9, 3])
    with torch.no_grad():
        scores = model.scores(batch)
        values = model.token_values(batch)
        expected_values = per_sequence_scores(model, batch)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert values.shape == (18,) and values.dtype == torch.float32
    assert_close(values, expected_values, rtol=1e-4, atol=1e-5)
    assert_close(scores, expected_values[torch.tensor([4, 5, 14, 17])], rtol=1e-4, atol=1e-5)
    # A document's score does not depend on its neighbours in the pack.
    with torch.no_grad():
        alone = model.scores(packed([9], seed=0))
    assert torch.isfinite(alone).all()


def test_scores_backward_reaches_backbone_and_head():
    model = tiny_scalar()
    batch = packed([4, 6])
    grad = torch.tensor([0.7, -1.3])
    (model.scores(batch) * grad).sum().backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    layer0 = next(model.model.layers[0].parameters())
    assert layer0.grad is not None and layer0.grad.abs().sum() > 0


def test_last_token_index_and_errors():
    assert last_token_index(torch.tensor([0, 3, 4, 10], dtype=torch.int32)).tolist() == [2, 3, 9]
    with pytest.raises(ValueError, match="cu_seqlens: expected a 1-D tensor"):
        last_token_index(torch.tensor([0], dtype=torch.int32))
    model = tiny_scalar()
    with pytest.raises(TypeError, match="batch: expected a PackedBatch"):
        model.scores(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="causal_lm: expected a transformers"):
        ScalarHeadModel.from_causal_lm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"score: expected nn.Linear\(32, 1\)"):
        ScalarHeadModel(model.model, torch.nn.Linear(32, 2))


@pytest.mark.parametrize("bias", [False, True])
def test_save_load_round_trip(tmp_path, bias):
    model = tiny_scalar(bias=bias).eval()
    batch = packed([3, 7, 2], seed=1)
    with torch.no_grad():
        before = model.scores(batch)
    model.save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["num_labels"] == 1 and config["fusedrl_scalar_head"] == {"bias": bias}
    loaded = ScalarHeadModel.from_pretrained(tmp_path / "rm", device="cpu").eval()
    assert (loaded.score.bias is not None) == bias
    assert not hasattr(loaded, "lm_head")
    with torch.no_grad():
        assert_close(loaded.scores(batch), before, rtol=1e-5, atol=1e-6)


def test_saved_head_loads_as_transformers_sequence_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_scalar(seed=3).eval()
    model.save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits[0, 0]
        model.model.set_attn_implementation("sdpa")
        ours = model.head(model.model(input_ids=ids).last_hidden_state[0, -1])
    assert_close(theirs.float(), ours, rtol=1e-5, atol=1e-6)


def test_from_pretrained_on_a_causal_lm_adds_a_fresh_head(tmp_path):
    torch.manual_seed(0)
    lm = build_model(config=TINY)
    save_model(lm, tmp_path / "lm")
    model = ScalarHeadModel.from_pretrained(tmp_path / "lm", device="cpu", init_std=0.0)
    assert torch.equal(model.score.weight, torch.zeros(1, 32))
    assert_close(model.model.embed_tokens.weight, lm.model.embed_tokens.weight, rtol=0, atol=0)
    with pytest.raises(TypeError, match="name_or_path: expected a str path"):
        ScalarHeadModel.from_pretrained(3)
