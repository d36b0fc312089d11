"""The demo's distillation step on a tiny policy: a smaller student, trained, scored; the policy is untouched."""
import copy

import torch

from fusedrl.demo.distill import DISTILL_STEPS, stage_config, student_arch
from fusedrl.demo.pipeline import DEMO_STEPS
from tests.e2e.test_demo_rl import tiny_context


def _context(tmp_path, steps=3):
    ctx = tiny_context(tmp_path)
    ctx.cfg.demo.stage_overrides = {"distill": {"loop.max_steps": steps, "rollout.prompts_per_rollout": 4,
                                                "rollout.token_budget": 128, "logging.plots": False}}
    ctx.score = lambda model: float(sum(p.numel() for p in model.parameters()))  # a stand-in the test can read
    return ctx


def test_stage_config_and_student_size(tmp_path):
    ctx = _context(tmp_path)
    cfg = stage_config(ctx)
    assert cfg.run.out_dir == str(tmp_path / "distill") and cfg.loop.max_steps == 3
    assert cfg.distill.mode == "mixed" and cfg.rollout.max_new_tokens == 4
    arch = student_arch(ctx.model)
    assert arch["hidden_size"] == ctx.model.config.hidden_size // 2 and arch["num_hidden_layers"] == 1
    assert arch["vocab_size"] == ctx.model.config.vocab_size
    assert DEMO_STEPS["distill"] is DISTILL_STEPS["distill"]


def test_distill_step_trains_a_smaller_student_and_leaves_the_policy(tmp_path):
    ctx = _context(tmp_path)
    before = copy.deepcopy(ctx.model.state_dict())
    numbers = DISTILL_STEPS["distill"](ctx)
    assert numbers["steps"] == 3 and numbers["student params"] < numbers["teacher params"]
    assert numbers["student score"] == numbers["student params"]  # ctx.score was called on the student
    assert numbers["divergence first"] > 0 and numbers["divergence last"] > 0
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())
    assert (tmp_path / "distill" / "metrics.jsonl").is_file()
