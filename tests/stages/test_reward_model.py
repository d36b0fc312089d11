"""Reward-model stage: pairs packed whole, losses through the loop, accuracy well above chance."""
import json
import random

import pytest
import torch

from fusedrl.train.loop import train
from fusedrl.models.scalar_head import ScalarHeadModel
from fusedrl.stages.groups import GroupedDataset, completion_token_mask, sequence_sums, tokenize_groups
from fusedrl.stages.reward_model import (RewardModelStage, build_reward_model, build_reward_model_stage,
                                               pair_scores, pairwise_accuracy, reward_model_data)
from fusedrl.data.tokenizer import build_char_tokenizer
from tests.helpers.alignment import TOKENIZER, config, preference_records, tiny_lm
from tests.helpers.alignment import one_thread  # noqa: F401 (autouse fixture)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_groups_stay_whole_and_ranking_points_at_members():
    records = preference_records(20, seed=1)
    examples, groups, kept = tokenize_groups(records, TOKENIZER, max_len=64)
    assert kept == list(range(20)) and all(len(g) == 2 for g in groups)
    dataset = GroupedDataset(examples, groups, token_budget=60, seed=0)
    seen = []
    for batch in dataset.next_batches(len(dataset)):
        ranking = batch.extras["ranking"]
        index = batch.extras["example_index"]
        for g, group_id in enumerate(batch.extras["group_index"].tolist()):
            assert index[ranking[g]].tolist() == groups[group_id]  # chosen then rejected, same batch
            seen.append(group_id)
        assert batch.total <= 60
    assert sorted(seen) == list(range(20))
    with pytest.raises(ValueError, match="token_budget: 10 is smaller than the longest group"):
        GroupedDataset(examples, groups, token_budget=10, seed=0)
    with pytest.raises(ValueError, match=r"groups\[1\]: expected 2 example indices"):
        GroupedDataset(examples, [[0, 1], [2]], token_budget=60, seed=0)


def test_pair_scores_enumerates_every_ordered_pair():
    scores = torch.tensor([5.0, 4.0, 3.0, 0.5, 0.25, 0.125])
    ranking = torch.tensor([[0, 1, 2], [3, 4, 5]])
    chosen, rejected = pair_scores(scores, ranking)
    assert chosen.tolist() == [5.0, 5.0, 4.0, 0.5, 0.5, 0.25]
    assert rejected.tolist() == [4.0, 3.0, 3.0, 0.25, 0.125, 0.125]


def test_sequence_sums_and_completion_mask():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], requires_grad=True)
    cu = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    sums = sequence_sums(values, cu, 6)
    assert sums.tolist() == [3.0, 3.0, 15.0]
    sums.backward(torch.tensor([1.0, -2.0, 0.5]))
    assert values.grad.tolist() == [1.0, 1.0, -2.0, 0.5, 0.5, 0.5]
    labels = torch.tensor([-100, 7, -100, -100, 9, -100])
    assert completion_token_mask(labels).tolist() == [False, False, True, False, False, True]


@pytest.mark.parametrize("loss", ["bradley_terry", "plackett_luce"])
def test_reward_model_learns_the_preference(tmp_path, loss):
    records = preference_records(48, seed=0)
    if loss == "plackett_luce":  # three completions ranked best first
        records = [{"prompt": r["prompt"], "completions": [r["chosen"], r["chosen"][:1] + "z", r["rejected"]]}
                   for r in records]
    held_out = preference_records(24, seed=7)
    cfg = config(data={"train": write_jsonl(tmp_path / "train.jsonl", records),
                       "eval": write_jsonl(tmp_path / "eval.jsonl", held_out),
                       "token_budget": 160, "max_len": 32},
                 optim={"lr": 3e-3}, schedule={"decay": "constant"}, loop={"max_steps": 12, "eval_at_start": True},
                 reward_model={"loss": loss}, run={"stage": "reward_model"})
    torch.manual_seed(0)
    model = ScalarHeadModel.from_causal_lm(tiny_lm(0))
    stage = build_reward_model_stage(cfg, model, TOKENIZER)
    before = pairwise_accuracy(model.eval(), stage.eval_batches)
    model.train()
    logged = []
    result = train(model, stage, cfg, run_dir=tmp_path / "run", on_step_end=lambda s, r: logged.append(r))
    after = result.eval_metrics
    assert 0.0 <= logged[0]["accuracy"] <= 1.0 and "margin" in logged[0]
    if loss == "bradley_terry":
        assert after["pairs"] == 24
    assert after["accuracy"] >= 0.9, (before, after)
    assert after["margin"] > before["margin"] + 0.5


def test_margin_loss_needs_margins_and_outcome_rm_learns(tmp_path):
    records = preference_records(8)
    with pytest.raises(ValueError, match=r"records\[0\]\['margin'\]: loss 'margin' needs a number"):
        reward_model_data(records, TOKENIZER, loss="margin", max_len=32, token_budget=128, seed=0)
    with_margin = [dict(r, margin=1.5) for r in records]
    dataset = reward_model_data(with_margin, TOKENIZER, loss="margin", max_len=32, token_budget=128, seed=0)
    (batch,) = dataset.next_batches(1)
    assert (batch.extras["margin"][batch.extras["ranking"][:, 0]] == 1.5).all()
    assert (batch.extras["margin"][batch.extras["ranking"][:, 1]] == 0.0).all()

    rng = random.Random(0)
    outcome = [{"prompt": "p: d", "completion": rng.choice(["ab", "ca", "bca"]) if i % 2 else
                rng.choice(["xy", "zx", "yzy"]), "label": i % 2} for i in range(40)]
    cfg = config(data={"train": write_jsonl(tmp_path / "o.jsonl", outcome), "eval": str(tmp_path / "o.jsonl"),
                       "token_budget": 128, "max_len": 32},
                 optim={"lr": 3e-3}, schedule={"decay": "constant"}, loop={"max_steps": 16},
                 reward_model={"loss": "outcome", "head_bias": True})
    model = ScalarHeadModel.from_causal_lm(tiny_lm(1), bias=True)
    stage = build_reward_model_stage(cfg, model, TOKENIZER)
    assert stage.normalize_by == "tokens"
    result = train(model, stage, cfg, run_dir=tmp_path / "run")
    assert result.eval_metrics["accuracy"] >= 0.9


def test_bad_config_and_model_errors(tmp_path):
    train_file = write_jsonl(tmp_path / "t.jsonl", preference_records(4))
    cfg = config(data={"train": train_file}, reward_model={"loss": "hinge"})
    model = ScalarHeadModel.from_causal_lm(tiny_lm(0))
    with pytest.raises(ValueError, match=r"reward_model.loss: expected one of .*got 'hinge'"):
        build_reward_model_stage(cfg, model, TOKENIZER)
    cfg = config(data={"train": train_file})
    with pytest.raises(TypeError, match="model: the reward-model stage trains a ScalarHeadModel"):
        build_reward_model_stage(cfg, tiny_lm(0), TOKENIZER)
    with pytest.raises(ValueError, match="records\\[0\\]\\['label'\\]: expected 0/1"):
        reward_model_data([{"prompt": "p", "completion": "a", "label": 3}], TOKENIZER, loss="outcome",
                          max_len=32, token_budget=64, seed=0)
    dataset = reward_model_data(preference_records(4), TOKENIZER, loss="bradley_terry", max_len=32,
                                token_budget=128, seed=0)
    with pytest.raises(TypeError, match="dataset: loss 'outcome' needs a PackedDataset"):
        RewardModelStage(dataset, loss="outcome")


def test_build_reward_model_from_config_and_path(tmp_path):
    cfg = config(model={"tokenizer": "char"})
    cfg.model.arch = {"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}
    tokenizer = build_char_tokenizer()
    model = build_reward_model(cfg, tokenizer, "cpu")
    assert isinstance(model, ScalarHeadModel) and model.config.hidden_size == 16
    model.save_pretrained(tmp_path / "rm")
    cfg.model.name_or_path = str(tmp_path / "rm")
    again = build_reward_model(cfg, tokenizer, "cpu")
    assert torch.equal(again.score.weight, model.score.weight)


def test_run_training_saves_a_loadable_scorer_and_resumes(tmp_path):
    from fusedrl.train.run import run_training

    cfg = config(data={"train": write_jsonl(tmp_path / "t.jsonl", preference_records(8)), "token_budget": 128,
                       "max_len": 32}, loop={"max_steps": 2}, checkpoint={"save_final": True},
                 run={"stage": "reward_model", "out_dir": str(tmp_path / "r")})
    model = ScalarHeadModel.from_causal_lm(tiny_lm(0))
    run_training(cfg, model=model, tokenizer=TOKENIZER)
    loaded = ScalarHeadModel.from_pretrained(tmp_path / "r" / "final", device="cpu")
    assert torch.equal(loaded.score.weight, model.score.weight)
    assert (tmp_path / "r" / "final" / "tokenizer.json").is_file()
    cfg.loop.max_steps = 3  # resume from the step-2 checkpoint into a fresh model
    result = run_training(cfg, model=ScalarHeadModel.from_causal_lm(tiny_lm(5)), tokenizer=TOKENIZER, resume=True)
    assert result.state.step == 3


def test_run_training_builds_the_scalar_head_model_itself(tmp_path):
    """`fusedrl train` with stage reward_model and no model given: STAGE_MODELS builds a ScalarHeadModel."""
    from fusedrl.train.run import run_training

    cfg = config(data={"train": write_jsonl(tmp_path / "t.jsonl", preference_records(8)), "token_budget": 128,
                       "max_len": 32}, loop={"max_steps": 1}, checkpoint={"save_final": True},
                 run={"stage": "reward_model", "out_dir": str(tmp_path / "r")}, model={"tokenizer": "char"})
    cfg.model.arch = {"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}
    run_training(cfg)
    loaded = ScalarHeadModel.from_pretrained(tmp_path / "r" / "final", device="cpu")
    assert loaded.config.hidden_size == 16
