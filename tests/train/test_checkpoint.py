"""Checkpoints: exact round trip, atomic writes, corrupt/partial detection, fallback on resume."""
import datetime
import logging
import os
import random

import numpy as np
import pytest
import torch

from fusedrl.train import checkpoint as ckpt
from fusedrl.train.checkpoint import (CheckpointError, latest_valid_checkpoint, list_checkpoints,
                                       load_checkpoint, save_checkpoint, verify_checkpoint)
from fusedrl.train.loop import build_optimizer, build_scheduler, train
from fusedrl.config import TrainConfig

from tests.helpers.fake_stage import FakeStage, TinyLM, make_batch


def _trained(seed_value=0):
    torch.manual_seed(seed_value)
    model = TinyLM()
    cfg = TrainConfig()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, 10)
    batch = make_batch([[1, 2, 3, 4], [5, 6]])
    stage = FakeStage()
    loss, _ = stage.loss(model, batch, batch.num_tokens)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _save(root, step, model, optimizer, scheduler, keep=3):
    return save_checkpoint(root, step, model=model, optimizer=optimizer, scheduler=scheduler,
                           stage_state={"position": step * 2}, trainer_state={"skipped_steps": 0}, keep=keep)


def test_round_trip_restores_model_optimizer_scheduler_rng(tmp_path):
    model, optimizer, scheduler = _trained()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    expected_draws = (torch.rand(3), np.random.rand(), random.random())

    fresh, fresh_opt, fresh_sched = _trained(seed_value=99)
    restored = load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert restored["stage"] == {"position": 2} and restored["trainer"]["step"] == 1
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    state_a, state_b = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    for key in state_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[key][name], state_b[key][name])
    assert fresh_sched.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.random.rand() == expected_draws[1] and random.random() == expected_draws[2]


def test_manifest_detects_corruption_and_missing_files(tmp_path):
    model, optimizer, scheduler = _trained()
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    verify_checkpoint(path)
    data = bytearray((path / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch in optimizer.pt"):
        verify_checkpoint(path)
    fresh, fresh_opt, fresh_sched = _trained(1)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)

    path2 = _save(tmp_path, 2, model, optimizer, scheduler)
    (path2 / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match="missing file rng.pt"):
        verify_checkpoint(path2)
    path3 = _save(tmp_path, 3, model, optimizer, scheduler)
    (path3 / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify_checkpoint(path3)


def test_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    model, optimizer, scheduler = _trained()
    _save(tmp_path, 1, model, optimizer, scheduler)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith("rng.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, model, optimizer, scheduler)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    # The half-written step 2 is a hidden temporary folder, never a checkpoint.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert any(p.name.startswith(".tmp-step_00000002") for p in tmp_path.iterdir())
    assert latest_valid_checkpoint(tmp_path).name == "step_00000001"
    _save(tmp_path, 3, model, optimizer, scheduler)  # the next save cleans the leftover
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_keep_prunes_old_checkpoints(tmp_path):
    model, optimizer, scheduler = _trained()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, optimizer, scheduler, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    model, optimizer, scheduler = _trained()
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    torch.save({"position": datetime.date(2020, 1, 1)}, path / "stage.pt")  # not allowed by weights_only
    # Re-sign the manifest so only weights_only stands between us and the pickle.
    import hashlib
    import json
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["stage.pt"] = hashlib.sha256((path / "stage.pt").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    fresh, fresh_opt, fresh_sched = _trained(1)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)


def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path, caplog, seed):
    cfg = TrainConfig()
    cfg.loop.max_steps, cfg.checkpoint.every, cfg.checkpoint.keep = 6, 2, 5
    cfg.logging.progress = False
    train(TinyLM(), FakeStage(), cfg, run_dir=tmp_path)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000004", "step_00000006"]
    with open(root / "step_00000006" / "model" / "model.safetensors", "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        handle.write(b"\x00\x01\x02")
    cfg.loop.max_steps = 7
    stage = FakeStage()
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        result = train(TinyLM(), stage, cfg, run_dir=tmp_path, resume=True)
    assert "checksum mismatch in model/model.safetensors" in caplog.text
    assert result.state.step == 7 and stage.position == 7 * stage.per_step  # resumed at step 4
