"""Config: TOML parsing, typed overrides, errors naming the key, the written config round-trips."""
import pytest

from fusedrl.config import (TrainConfig, describe_config, load_config, parse_overrides, save_config,
                                   to_toml)

TOML = """
[run]
stage = "sft"
seed = 3

[model]
tokenizer = "char"
[model.arch]
model_type = "qwen2"
hidden_size = 32

[optim]
lr = 1
betas = [0.9, 0.99]
max_grad_norm = 0.5

[loop]
max_steps = 20
"""


def _write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_is_parsed_into_typed_sections(tmp_path):
    cfg = load_config(_write(tmp_path, TOML))
    assert cfg.run.seed == 3 and cfg.loop.max_steps == 20
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # an int widens to float
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.model.arch == {"model_type": "qwen2", "hidden_size": 32}
    assert cfg.data.token_budget == TrainConfig().data.token_budget  # defaults fill the rest


def test_cli_overrides_are_type_checked(tmp_path):
    overrides = parse_overrides(["--optim.lr=3e-4", "--loop.max_steps", "7", "--logging.progress=false",
                                 "--optim.max_grad_norm=0", "--data.eval=none", "--optim.betas=0.8,0.9", "--data.eval=x.jsonl",
                                 "--model.arch.num_hidden_layers=2", "--run.out_dir=runs/a b"])
    cfg = load_config(_write(tmp_path, TOML), overrides)
    assert cfg.optim.lr == 3e-4 and cfg.loop.max_steps == 7 and cfg.logging.progress is False
    assert cfg.optim.max_grad_norm == 0.0 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.data.eval == "x.jsonl" and cfg.run.out_dir == "runs/a b"  # the later override wins
    assert cfg.model.arch["num_hidden_layers"] == 2 and cfg.model.arch["hidden_size"] == 32


@pytest.mark.parametrize("overrides, match", [
    ([("loop.max_steps", "ten")], r"loop.max_steps: expected int, got 'ten'"),
    ([("loop.max_steps", "2.5")], r"loop.max_steps: expected int, got 2.5"),
    ([("optim.lr", "fast")], r"optim.lr: expected float"),
    ([("logging.progress", "maybe")], r"logging.progress: expected bool"),
    ([("optim.betas", "a,b")], r"optim.betas\[0\]: expected float"),
    ([("loop.max_step", "3")], r"unknown config key 'loop.max_step'"),
    ([("looop.max_steps", "3")], r"unknown config key 'looop'"),
    ([("loop", "3")], r"loop: is a section"),
    ([("schedule.decay", "exp")], r"schedule.decay: expected one of \('constant', 'linear', 'cosine'\)"),
    ([("loop.max_steps", "0")], r"loop.max_steps: expected a value >= 1, got 0"),
    ([("optim.betas", "0.9")], r"optim.betas: expected 2 values"),
])
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("text, match", [
    ("[loop]\nmax_steps = true\n", r"loop.max_steps: expected int, got True"),
    ("[loop]\nmax_stepz = 3\n", r"unknown config key 'loop.max_stepz'"),
    ("[trainer]\nx = 1\n", r"unknown config key 'trainer'"),
    ("[optim]\nbetas = 0.9\n", r"optim.betas: expected List\[float\]"),
    ("loop = 3\n", r"loop: expected a table"),
    ("[loop\n", r"invalid TOML"),
])
def test_bad_files_name_the_key(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_config(_write(tmp_path, text))


def test_bad_override_syntax():
    with pytest.raises(ValueError, match="expected --section.field=value"):
        parse_overrides(["loop.max_steps=3"])
    with pytest.raises(ValueError, match="missing a value"):
        parse_overrides(["--loop.max_steps"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/nonexistent/run.toml")


def test_written_config_reads_back_equal(tmp_path):
    cfg = load_config(_write(tmp_path, TOML), [("model.name_or_path", "none"), ("data.eval", "e.jsonl")])
    save_config(cfg, tmp_path / "resolved.toml")
    assert load_config(tmp_path / "resolved.toml") == cfg
    assert "# name_or_path = None" in to_toml(cfg)


def test_optional_fields_default_to_none():
    # to_toml writes None as a comment, which reads back as the default: it must be None.
    import dataclasses
    import typing
    cfg = TrainConfig()
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if type(None) in typing.get_args(hints[f.name]):
                assert getattr(obj, f.name) is None, f"{section.name}.{f.name}"


def test_every_field_is_documented():
    text = describe_config()
    for section in ("run", "model", "data", "optim", "schedule", "loop", "checkpoint", "logging", "sft"):
        assert f"### [{section}]" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows), "a field lacks its docstring"


def test_stage_tables_are_validated_at_load_with_a_config_error(tmp_path):
    """pg.kl_kind = "k4" fails when the file is loaded, naming the field, the value and what is allowed."""
    from fusedrl.config import ConfigError
    from fusedrl.train.run import load_run_config

    path = _write(tmp_path, '[run]\nstage = "grpo"\n[rollout]\nverifier = "fusedrl.rollout.rewards:exact_match"\n'
                            '[pg]\nkl_kind = "k4"\n')
    with pytest.raises(ConfigError, match="pg.kl_kind: expected one of") as info:
        load_run_config(str(path))
    assert (info.value.field, info.value.value) == ("pg.kl_kind", "k4") and "k3" in info.value.allowed
    with pytest.raises(ConfigError) as info:
        load_run_config(str(path), [("pg.kl_kind", "k3"), ("rollout.backend", "vllm")])
    assert info.value.field == "rollout.backend" and info.value.allowed == ["native", "hf"]
    with pytest.raises(ConfigError) as info:
        load_run_config(str(path), [("run.stage", "nope")])
    assert info.value.field == "run.stage" and "grpo" in info.value.allowed
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[("optim.lr", "fast")])
    assert info.value.field == "optim.lr" and info.value.value == "fast"


def test_cli_turns_only_config_and_data_errors_into_one_line(tmp_path, monkeypatch, caplog):
    from fusedrl import cli
    from fusedrl.data.records import DataError

    path = _write(tmp_path, '[run]\nstage = "grpo"\n[pg]\nkl_kind = "k4"\n')
    assert cli.main(["train", str(path)]) == 2
    assert "pg.kl_kind: expected one of" in caplog.text

    def broken(cfg, resume=False, overwrite=False):
        raise DataError("data.train: record 3 has no 'prompt'")

    sft = _write(tmp_path, '[run]\nstage = "sft"\n')
    monkeypatch.setattr("fusedrl.train.run.run_training", broken)
    assert cli.main(["train", str(sft)]) == 2

    def bug(cfg, resume=False, overwrite=False):
        raise ValueError("a bug, not a config problem")

    monkeypatch.setattr("fusedrl.train.run.run_training", bug)
    with pytest.raises(ValueError, match="a bug"):  # keeps its traceback
        cli.main(["train", str(sft)])


def test_config_reference_lists_every_table(capsys):
    from fusedrl import cli

    assert cli.main(["config", "--reference"]) == 0
    out = capsys.readouterr().out
    for table in ("run", "model", "data", "optim", "schedule", "loop", "checkpoint", "logging", "sft",
                  "reward_model", "rejection", "dpo", "rollout", "pg", "ppo"):
        assert f"[{table}]" in out, table
    assert "`backend`" in out and "`kl_kind`" in out


def test_debug_flag_shows_the_traceback_of_a_config_error(tmp_path):
    from fusedrl import cli
    from fusedrl.config import ConfigError

    path = _write(tmp_path, '[run]\nstage = "grpo"\n[pg]\nkl_kind = "k4"\n')
    assert cli.main(["train", str(path)]) == 2
    with pytest.raises(ConfigError, match="pg.kl_kind"):
        cli.main(["--debug", "train", str(path)])
