"""Data loss items 2-4: a failed resume changes nothing, all-invalid checkpoints are listed, and a
changed field on resume is either applied for real or refused with its name."""
import json
import math

import pytest

from fusedrl.config import load_config
from fusedrl.stages import STAGE_CONFIGS
from fusedrl.train.checkpoint import list_checkpoints
from fusedrl.train.optim import lr_factor

from tests.robustness._helpers import argv, assert_one_line_error, cli, snapshot, train_rows


@pytest.fixture
def sft_run(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(argv("sft_tiny", out), capsys)
    assert code == 0, err
    return out


def test_resume_into_another_stages_folder_changes_nothing(sft_run, capsys):
    before = snapshot(sft_run)
    assert_one_line_error(*cli(argv("dpo_tiny", sft_run, "--resume"), capsys), str(sft_run), "'sft' run",
                          "run.stage")
    assert snapshot(sft_run) == before
    code, _, err = cli(argv("sft_tiny", sft_run, "--resume", "--loop.max_steps=3"), capsys)  # still resumable
    assert code == 0, err
    assert [r["step"] for r in train_rows(sft_run)][-1] == 3


def test_resume_with_every_checkpoint_invalid_lists_each_and_changes_nothing(sft_run, capsys):
    ckpts = list_checkpoints(sft_run / "checkpoints")
    assert len(ckpts) == 2
    (ckpts[0] / "optimizer.pt").write_bytes(b"garbage")
    (ckpts[1] / "manifest.json").unlink()
    before = snapshot(sft_run)
    line = assert_one_line_error(*cli(argv("sft_tiny", sft_run, "--resume", "--loop.max_steps=4"), capsys),
                                 "no valid checkpoint", ckpts[0].name, "optimizer.pt", ckpts[1].name,
                                 "manifest.json")
    assert "step 0" not in line
    assert snapshot(sft_run) == before  # metrics.jsonl kept


def test_resume_of_a_folder_without_checkpoints_refuses(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv("sft_tiny", out, "--checkpoint.every=0", "--checkpoint.save_final=false"), capsys)[0] == 0
    for path in list_checkpoints(out / "checkpoints"):
        import shutil
        shutil.rmtree(path)
    before = snapshot(out)
    assert_one_line_error(*cli(argv("sft_tiny", out, "--resume"), capsys), "no checkpoint", "--overwrite")
    assert snapshot(out) == before


def test_resume_of_a_missing_folder_refuses(tmp_path, capsys):
    out = tmp_path / "never"
    assert_one_line_error(*cli(argv("sft_tiny", out, "--resume"), capsys), str(out), "does not exist")
    assert not out.exists()


@pytest.mark.parametrize("override, key", [
    ("--model.arch.hidden_size=48", "model.arch.hidden_size"),
    ("--run.seed=3", "run.seed"),
    ("--data.max_len=40", "data.max_len"),
    ("--sft.normalize_by=sequences", "sft.normalize_by"),
])
def test_a_field_that_cannot_change_on_resume_is_refused_by_name(sft_run, capsys, override, key):
    before = snapshot(sft_run)
    assert_one_line_error(*cli(argv("sft_tiny", sft_run, "--resume", "--loop.max_steps=3", override), capsys),
                          key, "cannot change on resume")
    assert snapshot(sft_run) == before


def test_a_changed_lr_and_schedule_on_resume_are_really_used_and_recorded(sft_run, capsys):
    new = ["--resume", "--loop.max_steps=5", "--optim.lr=0.02", "--schedule.decay=linear",
           "--schedule.min_lr_ratio=0.5", "--optim.weight_decay=0.1"]
    code, _, err = cli(argv("sft_tiny", sft_run, *new), capsys)
    assert code == 0, err
    assert "optim.lr changes from 0.003 to 0.02" in err
    rows = {r["step"]: r for r in train_rows(sft_run)}
    cfg = load_config(sft_run / "config.toml", cls=STAGE_CONFIGS["sft"])  # the values in force
    assert (cfg.optim.lr, cfg.schedule.decay, cfg.optim.weight_decay, cfg.loop.max_steps) == (0.02, "linear", 0.1, 5)
    warmup = cfg.schedule.warmup_steps
    for step in (3, 4, 5):  # the lr logged at step s is the one of optimizer step s - 1
        expected = 0.02 * lr_factor(step - 1, total_steps=5, warmup_steps=warmup, decay="linear", min_lr_ratio=0.5)
        assert math.isclose(rows[step]["lr"], expected, rel_tol=1e-12), (step, rows[step]["lr"], expected)
    info = json.loads((sft_run / "run.json").read_text())
    assert len(info["resumed"]) == 1
