"""The demo's RL steps in quick mode on a tiny policy (the full demo runs in tests/e2e)."""
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fusedrl.demo.rl import RL_STEPS, stage_config
from fusedrl.models.scalar_head import ScalarHeadModel
from fusedrl.stages.configs_rl import RLTrainConfig

from tests.helpers import rl_tiny as T

QUICK = {"loop.max_steps": 2, "rollout.prompts_per_rollout": 2, "rollout.group_size": 2, "rollout.eval_prompts": 2,
         "rollout.token_budget": 128, "checkpoint.save_final": False, "logging.plots": False}


def tiny_context(tmp_path: Path):
    tok = T.tokenizer()
    records = [{"prompt": p, "completion": "aaa", "answer": "aaa"} for p in T.PROMPTS]
    data = {}
    for name in ("train", "eval"):
        data[name] = tmp_path / f"{name}.jsonl"
        data[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = RLTrainConfig()
    cfg.logging.progress = False
    cfg.demo = SimpleNamespace(max_new_tokens=4, stage_overrides={"grpo": dict(QUICK), "ppo": dict(QUICK)})
    model = T.tiny_policy(tok)
    ctx = SimpleNamespace(cfg=cfg, out_dir=tmp_path, tokenizer=tok, model=model, data=data)
    return ctx


def test_stage_config_takes_the_demo_tables_and_overrides(tmp_path):
    ctx = tiny_context(tmp_path)
    cfg = stage_config(ctx, "ppo")
    assert (cfg.loop.max_steps, cfg.rollout.group_size, cfg.rollout.max_new_tokens) == (2, 2, 4)
    assert cfg.run.out_dir == str(tmp_path / "ppo") and cfg.data.train == str(ctx.data["train"])
    assert cfg.ppo.epochs == 1 and cfg.ppo.value_lr == 1e-3


def test_grpo_and_ppo_steps_train_the_policy(tmp_path):
    ctx = tiny_context(tmp_path)
    with pytest.raises(ValueError, match="needs the 'reward_model' step"):
        RL_STEPS["ppo"](ctx)
    before = copy.deepcopy(ctx.model.state_dict())
    numbers = RL_STEPS["grpo"](ctx)
    assert numbers["steps"] == 2 and "reward first" in numbers and "sample acc last" in numbers
    moved = copy.deepcopy(ctx.model.state_dict())
    assert any(not torch.equal(before[k], v) for k, v in moved.items())
    torch.manual_seed(0)
    ctx.reward_model = ScalarHeadModel.from_causal_lm(copy.deepcopy(ctx.model))
    rm_head = ctx.reward_model.score.weight.detach().clone()
    numbers = RL_STEPS["ppo"](ctx)
    assert numbers["steps"] == 2 and numbers["value loss"] is not None
    assert any(not torch.equal(moved[k], v) for k, v in ctx.model.state_dict().items())
    assert torch.equal(ctx.reward_model.score.weight, rm_head)  # the critic trained a copy, not the RM
    assert (tmp_path / "ppo" / "metrics.jsonl").is_file()
