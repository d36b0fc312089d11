"""Direct-alignment stage: every loss runs, DPO raises the margin, reference log-probs cached exactly."""
import json

import pytest
import torch

import fusedrl.models.causal_lm as model_module
from fusedrl.train.loop import train
from fusedrl.stages.configs_alignment import DPO_LOSSES, DPOConfig
from fusedrl.stages import dpo as dpo_module
from fusedrl.stages.dpo import (DPOStage, attach_reference, build_dpo_stage, dpo_dataset, loss_options,
                                      reference_logprobs)
from fusedrl.stages.groups import GroupedDataset
from tests.conftest import assert_close
from tests.helpers.alignment import TOKENIZER, config, preference_records, tiny_lm
from tests.helpers.alignment import one_thread  # noqa: F401 (autouse fixture)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def per_sequence_logp(model, example):
    """Completion log-prob sum of one unpacked example from the model's full logits (the oracle)."""
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([example.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    targets = torch.tensor(example.labels[1:])
    logp = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return torch.where(targets != -100, logp, 0.0).sum()


def test_reference_logprobs_match_per_sequence_and_cache(tmp_path, monkeypatch):
    model = tiny_lm(2)
    dataset = dpo_dataset(preference_records(6), TOKENIZER, DPOConfig(), max_len=32, token_budget=50, seed=0)
    fresh = reference_logprobs(model, dataset.examples, 50, cache_dir=tmp_path)
    with torch.no_grad():
        oracle = torch.stack([per_sequence_logp(model, e) for e in dataset.examples])
    assert_close(fresh, oracle, rtol=1e-4, atol=1e-4)
    assert len(list(tmp_path.glob("ref_logp_*.safetensors"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(dpo_module, "sequence_logprobs", boom)
    cached = reference_logprobs(model, dataset.examples, 50, cache_dir=tmp_path)
    assert torch.equal(cached, fresh)
    with torch.no_grad():  # other weights: another key, so the cache is not used
        next(model.parameters()).add_(0.01)
    with pytest.raises(AssertionError, match="recomputed"):
        reference_logprobs(model, dataset.examples, 50, cache_dir=tmp_path)


@pytest.mark.parametrize("loss", DPO_LOSSES)
def test_every_loss_runs_and_accumulation_equals_one_batch(loss):
    cfg = DPOConfig(loss=loss, kto_kl=False)  # with z0 from mismatched pairs, z0 is per micro-batch
    dataset = dpo_dataset(preference_records(6, seed=3), TOKENIZER, cfg, max_len=32, token_budget=400, seed=0,
                          shuffle=False)
    model = tiny_lm(1)
    if loss not in ("simpo", "orpo"):
        ref = reference_logprobs(tiny_lm(5), dataset.examples, 400)
        attach_reference([dataset], ref)
    stage = DPOStage(dataset, loss=loss, options=loss_options(cfg))
    whole = dataset.batch(list(range(len(dataset.groups))))
    halves = [dataset.batch(list(range(0, 3))), dataset.batch(list(range(3, len(dataset.groups))))]
    normalizer = float(whole.num_seqs)
    loss_whole, metrics_whole = stage.loss(model, whole, normalizer)
    grad_whole = torch.autograd.grad(loss_whole, [model.model.embed_tokens.weight])[0]
    parts = [stage.loss(model, b, normalizer) for b in halves]
    loss_parts = sum(p[0] for p in parts)
    grad_parts = torch.autograd.grad(loss_parts, [model.model.embed_tokens.weight])[0]
    assert torch.isfinite(loss_whole) and grad_whole.abs().sum() > 0
    assert_close(loss_parts, loss_whole, rtol=1e-5, atol=1e-6)
    assert_close(grad_parts, grad_whole, rtol=1e-4, atol=1e-6)
    for name, value in metrics_whole.items():
        if loss != "kto" or name == "kl":  # KTO's reward means are over desirable / undesirable subsets
            assert_close(sum(p[1][name] for p in parts), value, rtol=1e-4, atol=1e-5)
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= set(metrics_whole)


def test_dpo_raises_the_chosen_vs_rejected_margin(tmp_path):
    cfg = config(data={"train": write_jsonl(tmp_path / "train.jsonl", preference_records(32)),
                       "eval": write_jsonl(tmp_path / "eval.jsonl", preference_records(16, seed=9)),
                       "token_budget": 200, "max_len": 32},
                 optim={"lr": 2e-3}, schedule={"decay": "constant"},
                 loop={"max_steps": 10, "eval_at_start": True}, dpo={"loss": "dpo", "beta": 0.5},
                 run={"out_dir": str(tmp_path / "run")})
    model = tiny_lm(0)
    stage = build_dpo_stage(cfg, model, TOKENIZER)
    before = stage.evaluate(model)
    assert abs(before["reward_margin"]) < 1e-5  # policy == reference at the start
    result = train(model, stage, cfg, run_dir=tmp_path / "run")
    after = result.eval_metrics
    assert after["reward_margin"] > 0.5, after
    assert after["reward_accuracy"] >= 0.9, after
    assert after["loss"] < before["loss"]
    assert list((tmp_path / "run" / "ref_cache").glob("ref_logp_*.safetensors"))


def test_reference_model_loaded_once_released_and_skipped_when_reference_free(tmp_path, monkeypatch):
    train_file = write_jsonl(tmp_path / "t.jsonl", preference_records(4))
    reference_dir = tmp_path / "ref"
    model_module.save_model(tiny_lm(4), reference_dir)
    loads = []
    real_build = model_module.build_model

    def counting_build(**kwargs):
        loads.append(kwargs.get("name_or_path"))
        return real_build(**kwargs)

    monkeypatch.setattr(model_module, "build_model", counting_build)
    base = dict(data={"train": train_file, "token_budget": 128, "max_len": 32}, run={"out_dir": str(tmp_path / "r")})
    stage = build_dpo_stage(config(dpo={"loss": "dpo", "reference": str(reference_dir)}, **base), tiny_lm(0), TOKENIZER)
    assert loads == [str(reference_dir)]
    assert "ref_logp" in stage.dataset.extras[0]
    build_dpo_stage(config(dpo={"loss": "ipo", "reference": str(reference_dir)}, **base), tiny_lm(0), TOKENIZER)
    assert loads == [str(reference_dir)]  # the second run read the cache: no reference loaded
    for loss in ("simpo", "orpo"):
        stage = build_dpo_stage(config(dpo={"loss": loss, "reference": "/no/such/model"}, **base), tiny_lm(0),
                                TOKENIZER)
        assert "ref_logp" not in stage.dataset.extras[0]
    assert loads == [str(reference_dir)]


def test_kto_groups_examples_with_mismatched_completions():
    records = preference_records(3, seed=4)
    dataset = dpo_dataset(records, TOKENIZER, DPOConfig(loss="kto"), max_len=32, token_budget=200, seed=0)
    assert dataset.group_size == 2 and len(dataset.groups) == 6
    desirable = [dataset.extras[g[0]]["desirable"] for g in dataset.groups]
    assert desirable == [1.0, 0.0] * 3
    attach_reference([dataset], torch.linspace(-3.0, -1.0, len(dataset.examples)))
    stage = DPOStage(dataset, loss="kto", options={"beta": 0.1})
    loss, metrics = stage.loss(tiny_lm(0), dataset.batch(list(range(6))), 12.0)
    assert torch.isfinite(loss) and metrics["kl"] >= 0
    no_kl = dpo_dataset(records, TOKENIZER, DPOConfig(loss="kto", kto_kl=False), max_len=32, token_budget=200, seed=0)
    assert no_kl.group_size == 1


def test_bad_config_values_give_clear_errors(tmp_path):
    base = dict(data={"train": write_jsonl(tmp_path / "t.jsonl", preference_records(2))})
    for dpo, match in [({"loss": "dpoo"}, r"dpo.loss: expected one of .*got 'dpoo'"),
                       ({"beta": -1.0}, r"dpo.beta: expected a number > 0 or None, got -1.0"),
                       ({"label_noise": 0.7}, r"dpo.label_noise: expected a value in \[0, 0.5\], got 0.7"),
                       ({"alpha": -0.5}, r"dpo.alpha: expected a number >= 0.0, got -0.5")]:
        with pytest.raises(ValueError, match=match):
            build_dpo_stage(config(dpo=dpo, **base), tiny_lm(0), TOKENIZER)
    ranked = [{"prompt": "p", "completions": ["a", "b", "c"]}]
    with pytest.raises(ValueError, match="needs prompt/chosen/rejected pairs, got groups of 3"):
        dpo_dataset(ranked, TOKENIZER, DPOConfig(), max_len=32, token_budget=64, seed=0)
    dataset = dpo_dataset(preference_records(2), TOKENIZER, DPOConfig(), max_len=32, token_budget=64, seed=0)
    with pytest.raises(ValueError, match="loss 'dpo' needs reference log-probs"):
        DPOStage(dataset, loss="dpo")
    assert isinstance(DPOStage(dataset, loss="simpo").dataset, GroupedDataset)


def test_stages_are_registered_and_run_through_run_training(tmp_path):
    from fusedrl.train.run import run_training
    from fusedrl.stages.configs_alignment import AlignmentTrainConfig
    from fusedrl.stages import STAGE_CONFIGS, STAGES
    from fusedrl.stages.rejection import build_rejection_stage
    from fusedrl.stages.reward_model import build_reward_model_stage

    assert STAGES["dpo"] is build_dpo_stage and STAGES["rejection"] is build_rejection_stage
    assert STAGES["reward_model"] is build_reward_model_stage
    assert all(STAGE_CONFIGS[s] is AlignmentTrainConfig for s in ("dpo", "rejection", "reward_model"))
    cfg = config(data={"train": write_jsonl(tmp_path / "t.jsonl", preference_records(6)), "token_budget": 128,
                       "max_len": 32}, loop={"max_steps": 2}, dpo={"loss": "simpo"},
                 run={"stage": "dpo", "out_dir": str(tmp_path / "run")})
    result = run_training(cfg, model=tiny_lm(0), tokenizer=TOKENIZER)
    assert result.state.step == 2 and "reward_accuracy" in result.last_metrics
