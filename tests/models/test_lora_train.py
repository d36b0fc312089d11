"""`fusedrl train` with [model] lora: adapters-only checkpoints, exact resume, merged final/, every policy stage."""
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from fusedrl.cli import main  # noqa: E402
from fusedrl.models.causal_lm import build_model  # noqa: E402
from fusedrl.models.lora import apply_lora, base_copy, is_peft_model  # noqa: E402
from tests.helpers import rl_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LORA = "--model.lora={r = 4, alpha = 8, target_modules = [\"q_proj\", \"v_proj\", \"up_proj\"]}"
QUIET = ["--logging.progress=false", "--logging.plots=false", "--run.num_threads=1", "--loop.eval_every=0"]


def _train(stage: str, out: Path, *extra: str) -> list:
    cfg = ROOT / "examples" / f"{stage}_tiny.toml"
    data = [f"--data.{k}={ROOT / 'examples' / 'data' / v}" for k, v in _data(stage).items()]
    assert main(["train", str(cfg), f"--run.out_dir={out}", *QUIET, *data, LORA, *extra]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _data(stage: str) -> dict:
    kind = {"sft": "sft", "dpo": "prefs", "grpo": "prompts", "ppo": "prompts"}[stage]
    return {"train": f"{kind}_train.jsonl", "eval": f"{kind}_eval.jsonl"}


def _steps(rows):
    return [r for r in rows if r["kind"] == "train"]


def test_sft_resume_is_exact_and_final_holds_the_merged_model(tmp_path):
    whole = _steps(_train("sft", tmp_path / "whole", "--loop.max_steps=3"))
    _train("sft", tmp_path / "split", "--loop.max_steps=2", "--checkpoint.every=1")
    ckpt = tmp_path / "split" / "checkpoints" / "step_00000002" / "model"
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == ["adapter_model.safetensors"]
    resumed = _steps(_train("sft", tmp_path / "split", "--loop.max_steps=3", "--resume"))
    assert resumed[-1]["step"] == 3 and resumed[-1]["loss"] == whole[-1]["loss"]
    final = build_model(name_or_path=str(tmp_path / "whole" / "final"), device="cpu")
    other = build_model(name_or_path=str(tmp_path / "split" / "final"), device="cpu")
    for (name, a), (_, b) in zip(final.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert not (tmp_path / "whole" / "final" / "adapter_model.safetensors").exists()
    assert (tmp_path / "whole" / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_with_lora_starts_from_its_reference(tmp_path):
    rows = _steps(_train("dpo", tmp_path / "dpo", "--loop.max_steps=2"))
    # the reference is the policy with its adapters off = the starting policy: rewards 0, loss log 2
    assert abs(rows[0]["chosen_reward"]) < 1e-6 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[1]["chosen_reward"] != 0.0


def test_grpo_with_lora_and_a_kl_penalty_trains(tmp_path):
    rows = _steps(_train("grpo", tmp_path / "grpo", "--loop.max_steps=3", "--pg.beta=0.05", "--optim.lr=0.05",
                         "--schedule.warmup_steps=0", "--rollout.verifier=fusedrl.rollout.rewards:ends_cleanly"))
    assert rows[0]["kl_ref"] == 0.0 and rows[-1]["kl_ref"] > 0  # adapters start at zero, then move
    assert (tmp_path / "grpo" / "final" / "model.safetensors").is_file()


def test_ppo_critic_of_a_lora_policy_is_a_plain_trainable_copy():
    tok = rl_tiny.tokenizer()
    policy = apply_lora(rl_tiny.tiny_policy(tok), {"r": 2})
    critic = base_copy(policy)
    assert not is_peft_model(critic) and not any("lora" in n for n, _ in critic.named_parameters())
    assert all(p.requires_grad for p in critic.parameters())
    base = rl_tiny.tiny_policy(tok)
    for (name, a), (_, b) in zip(critic.state_dict().items(), base.state_dict().items()):
        assert torch.equal(a, b), name
    assert sum(p.requires_grad for p in policy.parameters()) < sum(1 for _ in policy.parameters())


def test_lora_on_the_reward_model_stage_is_refused(tmp_path):
    cfg = ROOT / "examples" / "reward_model_tiny.toml"
    data = [f"--data.{k}={ROOT / 'examples' / 'data' / v}" for k, v in _data("dpo").items()]
    assert main(["train", str(cfg), f"--run.out_dir={tmp_path / 'rm'}", *QUIET, *data, LORA]) == 2
