"""The demo's distillation step on a tiny policy: a smaller student, trained, scored; the policy is untouched."""
import copy

import pytest
import torch

from fusedrl.demo.distill import DISTILL_STEPS, STUDENTS, make_student, stage_config, student_arch, truncated_student
from fusedrl.demo.pipeline import DEFAULT_STAGES, DEMO_STEPS
from fusedrl.models.causal_lm import build_model
from tests.e2e.test_demo_rl import tiny_context
from tests.helpers import rl_tiny as T


def _two_layer_policy(tok):
    torch.manual_seed(1)
    return build_model(config={
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(tok), "max_position_embeddings": 64,
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True})


def _context(tmp_path, steps=3):
    ctx = tiny_context(tmp_path)
    ctx.model = _two_layer_policy(ctx.tokenizer)
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
    assert DEMO_STEPS["distill"] is DISTILL_STEPS["distill"] and DEFAULT_STAGES[-1] == "distill"
    with pytest.raises(ValueError, match="student"):
        make_student(ctx, "huge")


def test_truncated_student_is_the_policy_without_its_upper_half():
    tok = T.tokenizer()
    policy = _two_layer_policy(tok)
    student = truncated_student(policy)
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    assert policy.config.num_hidden_layers == 2 and len(policy.model.layers) == 2  # the policy is a separate copy
    ids = torch.tensor([[tok.bos_token_id, 7, 8, 9, 7]])
    with torch.no_grad():
        assert not torch.allclose(student(ids).logits, policy(ids).logits)
        layer = policy.model.layers[1]  # with layer 2's residual branches zeroed, the policy computes the student
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        torch.testing.assert_close(student(ids).logits, policy(ids).logits)
        assert torch.equal(student.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("kind", STUDENTS)
def test_distill_step_trains_a_smaller_student_and_leaves_the_policy(tmp_path, kind):
    ctx = _context(tmp_path)
    before = copy.deepcopy(ctx.model.state_dict())
    numbers = DISTILL_STEPS["distill"](ctx, kind)
    assert numbers["steps"] == 3 and numbers["student params"] < numbers["teacher params"]
    assert numbers["student"] == kind
    assert numbers["student score"] == numbers["student before"] == numbers["student params"]  # scored the student
    assert numbers["divergence first"] > 0 and numbers["divergence last"] > 0
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())
    assert (tmp_path / "distill" / "metrics.jsonl").is_file()
