"""Data loss item 1: a run folder has an identity (run.json), a lock (run.lock), and one run.

A second run into a folder without --resume refuses (nothing written), --overwrite moves the old
run aside (nothing deleted), a live run's lock refuses another, a stale lock is taken over, and
pruning / .tmp-* clean-up touch only this run's files."""
import json
import os
import shutil
import socket
import subprocess
import sys

from fusedrl.train.checkpoint import list_checkpoints
from fusedrl.train.run_dir import LOCK_FILE, RUN_FILE

from tests.robustness._helpers import argv, assert_one_line_error, cli, snapshot, train_rows


def test_a_run_writes_its_identity_and_releases_its_lock(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(argv("sft_tiny", out), capsys)
    assert code == 0, err
    info = json.loads((out / RUN_FILE).read_text())
    assert info["stage"] == "sft" and len(info["run_id"]) == 12 and len(info["config_hash"]) == 64
    assert not (out / LOCK_FILE).exists()
    for ckpt in list_checkpoints(out / "checkpoints"):
        assert json.loads((ckpt / "manifest.json").read_text())["run_id"] == info["run_id"]


def test_a_second_fresh_run_into_the_folder_refuses_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv("sft_tiny", out), capsys)[0] == 0
    before = snapshot(out)
    line = assert_one_line_error(*cli(argv("sft_tiny", out, "--optim.lr=1e-3"), capsys), str(out), "--resume",
                                 "--overwrite")
    assert "already holds run" in line
    assert snapshot(out) == before


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv("sft_tiny", out), capsys)[0] == 0
    before, old_id = snapshot(out), json.loads((out / RUN_FILE).read_text())["run_id"]
    code, _, err = cli(argv("sft_tiny", out, "--overwrite"), capsys)
    assert code == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert json.loads((out / RUN_FILE).read_text())["run_id"] != old_id
    assert [r["step"] for r in train_rows(out)] == [1, 2]  # metrics.jsonl holds the new run only


def test_a_live_run_holds_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv("sft_tiny", out), capsys)[0] == 0
    live = {"pid": os.getppid(), "host": socket.gethostname(), "run_id": "x", "started": "now"}
    (out / LOCK_FILE).write_text(json.dumps(live))
    before = snapshot(out)
    for extra in ((), ("--resume",), ("--overwrite",)):
        assert_one_line_error(*cli(argv("sft_tiny", out, *extra), capsys), str(out), "live run",
                              f"pid {os.getppid()}")
        assert snapshot(out) == before


def test_a_lock_from_another_host_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv("sft_tiny", out), capsys)[0] == 0
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere-node-7", "started": "t"}))
    assert_one_line_error(*cli(argv("sft_tiny", out, "--resume"), capsys), "elsewhere-node-7", LOCK_FILE)


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv("sft_tiny", out), capsys)[0] == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "t"}))
    code, _, err = cli(argv("sft_tiny", out, "--resume", "--loop.max_steps=3"), capsys)
    assert code == 0, err
    assert "stale lock" in err and not (out / LOCK_FILE).exists()
    assert [r["step"] for r in train_rows(out)][-1] == 3


def test_pruning_and_tmp_cleanup_touch_only_this_runs_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv("sft_tiny", out), capsys)[0] == 0
    ckpts = out / "checkpoints"
    foreign = ckpts / "step_00000099"  # another run's checkpoint, newer by step number
    shutil.copytree(ckpts / "step_00000002", foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**manifest, "run_id": "someoneelse"}))
    foreign_tmp = ckpts / ".tmp-step_00000005-someoneelse-123"
    foreign_tmp.mkdir()
    own_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    own_tmp = ckpts / f".tmp-step_00000003-{own_id}-456"
    own_tmp.mkdir()
    code, _, err = cli(argv("sft_tiny", out, "--resume", "--loop.max_steps=4"), capsys)
    assert code == 0, err
    assert "belongs to run someoneelse" in err  # skipped, not loaded: the run went on from step 2
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4]
    assert foreign.is_dir() and foreign_tmp.is_dir() and not own_tmp.exists()
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000003", "step_00000004", "step_00000099"]
