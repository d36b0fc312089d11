"""The demo's alignment steps, end to end on a tiny model in quick sizes."""
import json
import random
from types import SimpleNamespace

import pytest
import torch

from fusedrl.demo.alignment import (ALIGNMENT_STEPS, AlignmentTrainConfig, corrupt, preference_pairs,
                                           rm_agreement, stage_config)
from fusedrl.models.scalar_head import ScalarHeadModel
from fusedrl.demo.tasks import TaskConfig, make_split
from tests.helpers.alignment import TINY, one_thread  # noqa: F401 (autouse fixture)
from fusedrl.data.tokenizer import build_char_tokenizer


def test_corrupt_always_changes_the_answer():
    rng = random.Random(0)
    for answer in ["a", "ab", "abc", "aaaa", "12", "7"]:
        for _ in range(20):
            assert corrupt(answer, rng, "abc0123456789") != answer
    pairs = preference_pairs([{"prompt": "reverse: ab", "answer": "ba"}] * 3, seed=0, alphabet="ab", limit=2)
    assert len(pairs) == 2 and all(p["chosen"] == "ba" and p["rejected"] != "ba" for p in pairs)


def test_rm_agreement_counts_right_over_wrong_pairs():
    rewards = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 5.0]])
    correct = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # row 0: right 0 vs wrong 1, 2 -> both ordered; row 1: right 0, 1 vs wrong 2 -> neither
    assert rm_agreement(rewards, correct) == pytest.approx(2 / 4)


@pytest.fixture
def ctx(tmp_path):
    tokenizer = build_char_tokenizer()
    task = TaskConfig(kind="reverse", train_size=48, eval_size=8, max_len=3, alphabet="abc")
    split = make_split(task)
    data = {}
    for name, records in split.items():
        data[name] = tmp_path / f"{name}.jsonl"
        data[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = AlignmentTrainConfig()
    cfg.run.device = "cpu"
    cfg.data.max_len, cfg.data.token_budget = 48, 400
    cfg.loop.max_steps = 10  # the steps take their minimum lengths
    cfg.logging.progress, cfg.logging.plots, cfg.checkpoint.save_final = False, False, True
    cfg.task = task
    cfg.demo = SimpleNamespace(stage_overrides={"rejection": {"rejection.max_prompts": 12}}, max_new_tokens=4)
    torch.manual_seed(0)
    model = build_model_for(tokenizer)
    return SimpleNamespace(cfg=cfg, out_dir=tmp_path, tokenizer=tokenizer, model=model, data=data,
                           eval_records=split["eval"])


def build_model_for(tokenizer):
    from fusedrl.models.causal_lm import build_model
    config = dict(TINY, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    return build_model(config=config, device="cpu")


def test_alignment_steps_run_in_order_and_report_numbers(ctx):
    numbers = ALIGNMENT_STEPS["reward_model"](ctx)
    assert isinstance(ctx.reward_model, ScalarHeadModel)
    assert 0.0 <= numbers["rm accuracy"] <= 1.0 and numbers["steps"] == 8
    loaded = ScalarHeadModel.from_pretrained(ctx.data["reward_model"], device="cpu")
    assert torch.equal(loaded.score.weight, ctx.reward_model.score.weight)
    before = [p.detach().clone() for p in ctx.model.parameters()]
    numbers = ALIGNMENT_STEPS["rejection"](ctx)
    assert numbers["steps"] == 6 and 0.0 <= numbers["selected right"] <= 1.0
    assert (ctx.out_dir / "rejection" / "rejection_cache").is_dir()
    numbers = ALIGNMENT_STEPS["dpo"](ctx)
    assert numbers["steps"] == 6 and 0.0 <= numbers["reward accuracy"] <= 1.0 and "rm score" in numbers
    after = list(ctx.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the policy was trained in place


def test_stage_overrides_reach_the_stage_tables(ctx):
    ctx.cfg.demo.stage_overrides = {"dpo": {"dpo.beta": 0.3, "loop.max_steps": 3}}
    cfg = stage_config(ctx, "dpo")
    assert cfg.dpo.beta == 0.3 and cfg.loop.max_steps == 3 and cfg.run.out_dir.endswith("dpo")
    ctx.cfg.demo.stage_overrides = {"dpo": {"dpo.loss": "nope"}}
    with pytest.raises(ValueError, match="dpo.loss: expected one of"):
        stage_config(ctx, "dpo")
    with pytest.raises(ValueError, match="'rejection' needs the 'reward_model' step"):
        ALIGNMENT_STEPS["rejection"](ctx)
