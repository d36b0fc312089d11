"""`fusedrl train` on the example configs: every examples/*.toml parses with its stage's config class, and
the tiny CPU configs (examples/*_tiny.toml) really train through the CLI, from any working directory.

The data are small fixtures of the demo's "reverse a word" task (examples/data): preference pairs
({"prompt", "chosen", "rejected"}, chosen = the reversed word, rejected = it with one letter changed)
for reward_model / dpo, and prompts with answers ({"prompt", "answer"}) for rejection / grpo / ppo.
"""
import dataclasses
import json
import math
from pathlib import Path

import pytest

from fusedrl.cli import main
from fusedrl.config import load_config
from fusedrl.config_io import read_toml
from fusedrl.rollout.rewards import load_verifier
from fusedrl.stages.configs_alignment import check_section
from fusedrl.stages.configs_rl import check_rollout, resolve_pg_options
from fusedrl.stages import STAGE_CONFIGS, STAGES
from fusedrl.stages.policy_gradient import PG_STAGES
from fusedrl.stages.ppo import resolve_ppo_options

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.toml") if p.name != "demo.toml")  # demo.toml: DemoConfig
RECIPE_STAGES = ("reward_model", "rejection", "dpo", "grpo", "ppo")
QUIET = ["--logging.progress=false", "--logging.plots=false", "--run.num_threads=1"]


def _data_overrides(cfg_path: Path) -> list:
    """--data.train / --data.eval as absolute paths (the files name them relative to the repository root)."""
    data = read_toml(cfg_path)["data"]
    return [f"--data.{key}={ROOT / data[key]}" for key in ("train", "eval") if data.get(key)]


def _train(name: str, out: Path, *extra: str) -> list:
    """Run `fusedrl train examples/NAME.toml` into OUT; return its metrics records."""
    cfg = ROOT / "examples" / f"{name}.toml"
    argv = ["train", str(cfg), f"--run.out_dir={out}", *QUIET, *_data_overrides(cfg), *extra]
    assert main(argv) == 0, argv
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "report.md").is_file()
    saved = load_config(out / "config.toml", cls=STAGE_CONFIGS[read_toml(cfg)["run"]["stage"]])
    assert saved.run.out_dir == str(out)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_rows(records: list, steps: int) -> list:
    rows = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows), rows
    return rows


def _check_stage_tables(cfg, stage: str) -> None:
    """The checks the stage's builder runs on its own tables (they need no model): raise ValueError on a bad value."""
    if stage in ("reward_model", "rejection", "dpo"):
        check_section(getattr(cfg, stage), stage)
    elif stage in PG_STAGES:
        check_rollout(cfg.rollout)
        resolve_pg_options(dataclasses.replace(cfg.pg, algo=stage), cfg.rollout)
    elif stage == "ppo":
        check_rollout(cfg.rollout)
        resolve_ppo_options(cfg.ppo)


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    """Run every test from a folder that is not the repository root: no path may depend on the cwd."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def reward_model_run(tmp_path_factory):
    """A 3-step reward-model run of examples/reward_model_tiny.toml (shared by the PPO test)."""
    out = tmp_path_factory.mktemp("rm") / "run"
    return out, _train("reward_model_tiny", out, "--loop.max_steps=3", "--loop.eval_every=0")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses_with_the_config_class_of_its_stage(path):
    stage = read_toml(path)["run"]["stage"]
    assert stage in STAGES, (path.name, stage)
    cfg = load_config(path, cls=STAGE_CONFIGS[stage])
    assert isinstance(cfg, STAGE_CONFIGS[stage]) and cfg.run.stage == stage
    _check_stage_tables(cfg, stage)
    header = path.read_text().split("\n[", 1)[0]
    assert f"fusedrl train examples/{path.name}" in header, f"{path.name}: the header shows no command line"
    for spec in (getattr(getattr(cfg, "rollout", None), "verifier", None),
                 getattr(getattr(cfg, "rejection", None), "verifier", None)):
        if spec is not None:
            load_verifier(spec)  # the named function exists and takes (prompt, completion, **fields)
    if path.stem.endswith("_tiny"):
        for key in ("train", "eval"):  # every tiny example ships its data under examples/data/
            value = getattr(cfg.data, key)
            assert not value or (ROOT / value).is_file(), (path.name, key, value)
            assert not value or value.startswith("examples/data/"), (path.name, key, value)
        assert cfg.run.device == "cpu" and cfg.model.name_or_path is None and cfg.model.tokenizer == "char"
    else:
        assert cfg.model.name_or_path and cfg.model.dtype in ("auto", "bfloat16"), path.name


def test_every_stage_has_a_real_model_recipe_and_a_tiny_config():
    names = {p.stem for p in EXAMPLES}
    for stage in RECIPE_STAGES:
        assert f"{stage}_qwen2_0.5b" in names and f"{stage}_tiny" in names, stage
        assert read_toml(ROOT / "examples" / f"{stage}_qwen2_0.5b.toml")["run"]["stage"] == stage
    # the recipes chain: rejection and PPO score with the reward model the reward-model recipe writes
    recipe = lambda stage: read_toml(ROOT / "examples" / f"{stage}_qwen2_0.5b.toml")  # noqa: E731
    rm_final = recipe("reward_model")["run"]["out_dir"] + "/final"
    assert recipe("rejection")["rejection"]["reward_model"] == rm_final
    assert recipe("ppo")["rollout"]["reward_model"] == rm_final


def test_stage_table_checks_catch_a_bad_example_value():
    path = ROOT / "examples" / "grpo_tiny.toml"
    with pytest.raises(ValueError, match="rollout.group_size"):
        _check_stage_tables(load_config(path, [("rollout.group_size", "1")], cls=STAGE_CONFIGS["grpo"]), "grpo")
    path = ROOT / "examples" / "rejection_qwen2_0.5b.toml"
    both = [("rejection.verifier", "fusedrl.rollout.rewards:exact_match")]  # and the recipe's reward_model
    bad = load_config(path, both, cls=STAGE_CONFIGS["rejection"])
    with pytest.raises(ValueError, match="set exactly one"):
        _check_stage_tables(bad, "rejection")


def test_reward_model_tiny_trains(reward_model_run):
    out, records = reward_model_run
    rows = _train_rows(records, 3)
    assert all(0.0 <= r["accuracy"] <= 1.0 and "margin" in r for r in rows)
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and evals[-1]["eval/pairs"] == 8  # the whole eval file: 8 pairs


def test_sft_tiny_trains(tmp_path):
    """SFT on the shipped examples/data (no `fusedrl demo` needed first)."""
    rows = _train_rows(_train("sft_tiny", tmp_path / "sft", "--loop.max_steps=3", "--loop.eval_every=0"), 3)
    assert rows[0]["trained_tokens"] > 0


def test_dpo_tiny_trains(tmp_path):
    rows = _train_rows(_train("dpo_tiny", tmp_path / "dpo", "--loop.max_steps=2", "--loop.eval_every=0"), 2)
    assert all("reward_accuracy" in r and "reward_margin" in r for r in rows)
    # the reference is the starting policy: at step 1 the implicit rewards are exactly 0
    assert abs(rows[0]["chosen_reward"]) < 1e-5 and abs(rows[0]["rejected_reward"]) < 1e-5
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert (tmp_path / "dpo" / "ref_cache").is_dir()


def test_rejection_tiny_trains(tmp_path):
    rows = _train_rows(_train("rejection_tiny", tmp_path / "rs", "--loop.max_steps=2",
                              "--rejection.max_prompts=8"), 2)
    assert rows[0]["selected_reward"] >= rows[0]["random_reward"]
    assert (tmp_path / "rs" / "rejection_cache").is_dir()


def test_grpo_tiny_trains(tmp_path):
    # ends_cleanly (a format check) rewards an untrained model's samples unevenly, so the
    # group-normalised advantages are not all zero and the policy really gets a gradient
    rows = _train_rows(_train("grpo_tiny", tmp_path / "grpo", "--loop.max_steps=3",
                              "--rollout.verifier=fusedrl.rollout.rewards:ends_cleanly"), 3)
    assert any(r["reward_std"] > 0 and r["grad_norm"] > 0 for r in rows), rows
    assert all(r["generated_tokens"] > 0 and r["groups_kept"] == 4 for r in rows)


def test_ppo_tiny_trains_with_a_verifier(tmp_path):
    records = _train("ppo_tiny", tmp_path / "ppo", "--loop.max_steps=2")
    rows = _train_rows(records, 2)
    assert all("value_loss" in r for r in rows) and rows[0]["rollout_phase"] == 0
    assert [r for r in records if r["kind"] == "eval"], "no evaluation at the end"


def test_ppo_tiny_trains_with_the_reward_model_run(tmp_path, reward_model_run):
    rm = reward_model_run[0] / "final"
    rows = _train_rows(_train("ppo_tiny", tmp_path / "ppo_rm", "--loop.max_steps=2", "--rollout.verifier=none",
                              f"--rollout.reward_model={rm}", f"--ppo.value_model={rm}"), 2)
    # a reward model scores every sample differently; the critic starts from it, so it has a loss
    assert rows[0]["reward_std"] > 0 and rows[0]["value_loss"] > 0 and rows[0]["grad_norm"] > 0


def test_prm_tiny_trains_and_beats_the_majority_rate(tmp_path):
    records = _train("prm_tiny", tmp_path / "prm", "--loop.max_steps=30", "--loop.eval_every=30")
    rows = _train_rows(records, 30)
    assert all(0.0 <= r["step_accuracy"] <= 1.0 for r in rows)
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert final["eval/step_accuracy"] > final["eval/majority_rate"], final
    assert {"eval/solution_accuracy_min", "eval/solution_accuracy_prod", "eval/solution_accuracy_last"} <= set(final)


def test_distill_tiny_trains_from_the_sft_example(tmp_path):
    teacher = tmp_path / "sft"
    _train("sft_tiny", teacher, "--loop.max_steps=2", "--loop.eval_every=0")
    records = _train("distill_tiny", tmp_path / "distill", "--loop.max_steps=3", "--loop.eval_every=3",
                     f"--distill.teacher={teacher / 'final'}")
    rows = _train_rows(records, 3)
    assert all(r["divergence"] > 0 for r in rows)
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert final["eval/divergence"] > 0 and 0.0 <= final["eval/accuracy"] <= 1.0
