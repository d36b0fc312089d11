"""LoRA through PEFT: the reference is the same model with its adapters off, only adapters train, merged final/."""
import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")  # the `lora` extra; in the dev extra, so installed for the tests

from fusedrl.config import ModelConfig, load_config  # noqa: E402
from fusedrl.config_io import ConfigError  # noqa: E402
from fusedrl.data.records import Example, pack_examples  # noqa: E402
from fusedrl.models.causal_lm import build_model, load_reference, token_logprobs  # noqa: E402
from fusedrl.models.lora import (  # noqa: E402
    AdapterDisabled, apply_lora, check_head, is_peft_model, merged_state_dict, unwrap,
)
from fusedrl.train.checkpoint import CheckpointError, load_weights, save_weights  # noqa: E402
from tests.helpers import rl_tiny  # noqa: E402

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _adapted(tok, seed=0, table=LORA):
    """(base copy, LoRA policy whose B matrices are random, so adapted != base)."""
    base = rl_tiny.tiny_policy(tok, seed)
    snapshot = copy.deepcopy(base)
    model = apply_lora(base, table)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return snapshot, model


def _batch(tok, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        ids = torch.randint(3, len(tok), (3 + 2 * i,), generator=g).tolist()
        examples.append(Example(ids, [-100] + ids[1:]))
    return pack_examples(examples, 4096)[0]


def test_reference_is_the_base_model_exactly_and_the_policy_is_adapted():
    tok = rl_tiny.tokenizer()
    base, model = _adapted(tok)
    batch = _batch(tok)
    ref = load_reference(ModelConfig(), None, model)
    assert isinstance(ref, AdapterDisabled)
    with torch.no_grad():
        expected = token_logprobs(base, batch)
        assert torch.equal(token_logprobs(ref, batch), expected)
        adapted = token_logprobs(model, batch)
    assert (adapted - expected).abs().max() > 1e-3  # the adapters do change the policy
    with torch.no_grad():  # and the view left them on
        assert torch.equal(token_logprobs(model, batch), adapted)
    assert load_reference(ModelConfig(), None, base) is not base  # no LoRA: a frozen copy, as before


def test_a_grpo_step_takes_its_reference_logprobs_from_the_disabled_adapters():
    tok = rl_tiny.tokenizer()
    base, model = _adapted(tok)
    with_view = rl_tiny.pg_stage(tok, beta=0.1, ref_model=load_reference(ModelConfig(), None, model))
    with_base = rl_tiny.pg_stage(tok, beta=0.1, ref_model=base.requires_grad_(False))
    got, expected = with_view.micro_batches(model, 0), with_base.micro_batches(model, 0)
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.extras["ref_logp"], b.extras["ref_logp"])
        assert a.extras["ref_logp"].abs().sum() > 0


def test_dpo_reference_of_a_lora_policy_is_the_base_model():
    from fusedrl.stages.configs_alignment import DPOConfig
    from fusedrl.stages.dpo import compute_reference, reference_logprobs

    tok = rl_tiny.tokenizer()
    base, model = _adapted(tok)
    batch_examples = [Example([3, 4, 5, 6], [-100, -100, 5, 6]), Example([4, 4, 3], [-100, 4, 3])]
    got = compute_reference(DPOConfig(), model, batch_examples, 64, None, ModelConfig())
    assert torch.equal(got, reference_logprobs(base, batch_examples, 64))
    assert not torch.equal(got, reference_logprobs(model, batch_examples, 64))


def test_only_adapter_parameters_train_and_no_second_model_is_held(tmp_path):
    from fusedrl.train.loop import train

    tok = rl_tiny.tokenizer()
    _, model = _adapted(tok)
    ref = load_reference(ModelConfig(), None, model)
    stage = rl_tiny.pg_stage(tok, beta=0.1, ref_model=ref, verifier="fusedrl.rollout.rewards:ends_cleanly")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    train(model, stage, rl_tiny.train_cfg(2, lr=1e-2), run_dir=tmp_path)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    # memory: the reference adds no tensor; a frozen copy (no LoRA) doubles them
    storages = lambda *ms: {p.untyped_storage().data_ptr() for m in ms for p in m.parameters()}  # noqa: E731
    assert storages(model, stage.ref_model) == storages(model)
    assert isinstance(stage.ref_model, AdapterDisabled) and stage.ref_model.policy is model
    plain = rl_tiny.tiny_policy(tok)
    assert len(storages(plain, load_reference(ModelConfig(), None, plain))) == 2 * len(storages(plain))


def test_checkpoints_hold_and_restore_the_adapters_only(tmp_path):
    tok = rl_tiny.tokenizer()
    _, model = _adapted(tok, seed=0)
    save_weights(model, tmp_path / "model")
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    _, other = _adapted(tok, seed=3)  # same base (seed 3 base differs: but only adapters are loaded)
    load_weights(other, tmp_path / "model")
    mine = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for name, p in other.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, mine[name])
    _, wrong = _adapted(tok, table={**LORA, "r": 2})
    with pytest.raises(CheckpointError, match="adapter weights do not match"):
        load_weights(wrong, tmp_path / "model")


def test_merged_weights_give_the_adapted_logprobs(tmp_path):
    tok = rl_tiny.tokenizer()
    _, model = _adapted(tok)
    batch = _batch(tok, seed=1)
    from fusedrl.models.causal_lm import save_model
    save_model(model, tmp_path / "final", tokenizer=tok, merge_adapters=True)
    merged = build_model(name_or_path=str(tmp_path / "final"), device="cpu", dtype="float32")
    assert not is_peft_model(merged) and not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(merged, batch), token_logprobs(model, batch), atol=2e-5, rtol=0)
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").is_file()
    names = set(merged_state_dict(model))
    assert not any(".base_layer." in k or ".lora_" in k for k in names)
    assert names == set(merged.state_dict())  # the plain model's names


def _arch(tok):
    return {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(tok), "max_position_embeddings": 64,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True}


@pytest.mark.parametrize("table,key", [
    ({"r": 0}, "model.lora.r"), ({"r": 2.5}, "model.lora.r"), ({"alpha": 8}, "model.lora.r"),
    ({"r": 4, "rank": 4}, "model.lora.rank"), ({"r": 4, "dropout": 1.5}, "model.lora.dropout"),
    ({"r": 4, "alpha": -1}, "model.lora.alpha"), ({"r": 4, "target_modules": []}, "model.lora.target_modules"),
    ({"r": 4, "target_modules": ["q_proj", "lm_head"]}, "model.lora.target_modules"),
])
def test_bad_lora_tables_name_the_key(table, key):
    body = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + "}"
    with pytest.raises(ConfigError) as err:
        load_config(None, [("model.lora", body)])
    assert err.value.field == key and str(err.value).startswith(key)


def test_missing_peft_and_an_adapted_head_are_one_line_errors(monkeypatch):
    tok = rl_tiny.tokenizer()
    wrapped = peft.get_peft_model(rl_tiny.tiny_policy(tok), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ConfigError, match="model.lora.target_modules: the LM head got an adapter"):
        check_head(wrapped)
    with pytest.raises(ConfigError, match="model.lora.target_modules: .*nope"):
        apply_lora(rl_tiny.tiny_policy(tok), {"r": 2, "target_modules": ["nope"]})
    monkeypatch.setitem(__import__("sys").modules, "peft", None)
    with pytest.raises(ConfigError, match=r"model.lora: LoRA needs the optional extra: pip install 'fusedrl\[lora\]'"):
        load_config(None, [("model.lora", "{r = 4}")])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_build_policy_wraps_and_gradients_reach_only_the_adapters(checkpointing):
    from fusedrl.models.causal_lm import build_policy

    tok = rl_tiny.tokenizer()
    arch = {k: v for k, v in _arch(tok).items() if k not in ("vocab_size", "eos_token_id", "pad_token_id")}
    grads = []
    for gc in (False, checkpointing):
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, dtype="float32", gradient_checkpointing=gc, lora=dict(LORA))
        model = build_policy(cfg, tok, torch.device("cpu"))
        assert is_peft_model(model) and model.training
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
        batch = _batch(tok, seed=2)
        upstream = torch.randn(batch.total, generator=torch.Generator().manual_seed(3))
        (token_logprobs(model, batch) * upstream).sum().backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n})
        assert all(g.abs().sum() > 0 for g in grads[-1].values())
    for name in grads[0]:  # activation checkpointing recomputes the same adapted forward
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_the_fused_head_refuses_an_adapted_lm_head():
    from fusedrl.models.causal_lm import lm_head

    tok = rl_tiny.tokenizer()
    wrapped = peft.get_peft_model(rl_tiny.tiny_policy(tok), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="the LM head carries a LoRA adapter"):
        token_logprobs(wrapped, _batch(tok))
    _, model = _adapted(tok)
    assert lm_head(model)[0] is unwrap(model).get_output_embeddings().weight
