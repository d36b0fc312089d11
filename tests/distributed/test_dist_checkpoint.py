"""dist_checkpoint in one process (world size 1): layout, atomic publish, verification, pruning, RNG."""
import json
import random

import numpy as np
import pytest
import torch

from fusedrl.train.dist_checkpoint import (DistCheckpointError, latest_dist_checkpoint, list_dist_checkpoints,
                                           load_dist_checkpoint, save_dist_checkpoint, verify_dist_checkpoint)
from tests.distributed import _dist_helpers as h


def _trained(seed=0):
    model = h.tiny_model(seed)
    optimizer = h.optimizer_for(model)
    h.train_step(model, optimizer, 0, algo="sft", rank=0, world=1)
    return model, optimizer


def test_roundtrip_restores_everything(tmp_path):
    model, optimizer = _trained()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    torch.manual_seed(42), np.random.seed(42), random.seed(42)
    path = save_dist_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, trainer_state={"step": 1},
                                rank_state={"position": 7, "order": torch.arange(5)},
                                shared_state={"scheduler": scheduler.state_dict()})
    expected_draws = (torch.rand(3), np.random.rand(), random.random())
    assert sorted(p.name for p in path.iterdir()) == ["dcp", "manifest.json", "ranks", "shared.pt", "trainer.json"]
    assert (path / "ranks" / "rank_00000.pt").is_file() and (path / "dcp" / ".metadata").is_file()

    other, other_opt = h.tiny_model(seed=5), None
    other_opt = h.optimizer_for(other)
    restored = load_dist_checkpoint(path, model=other, optimizer=other_opt)
    assert restored["trainer"] == {"step": 1} and not restored["resharded"]
    assert restored["rank_state"]["position"] == 7 and torch.equal(restored["rank_state"]["order"], torch.arange(5))
    assert restored["shared"]["scheduler"]["base_lrs"] == scheduler.state_dict()["base_lrs"]
    draws = (torch.rand(3), np.random.rand(), random.random())  # RNG restored to the saved state
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
    for name, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name
    state, other_state = optimizer.state_dict()["state"], other_opt.state_dict()["state"]
    for key in state:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key][field], other_state[key][field]), (key, field)


def test_partial_checkpoint_is_invisible_and_pruned(tmp_path):
    model, optimizer = _trained()
    (tmp_path / ".tmp-step_00000009" / "dcp").mkdir(parents=True)  # a writer killed mid-save
    assert list_dist_checkpoints(tmp_path) == [] and latest_dist_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_dist_checkpoint(tmp_path, step, model=model, optimizer=optimizer, keep=2)
    assert [p.name for p in list_dist_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert not list(tmp_path.glob(".tmp-*"))  # the killed writer's leftovers are cleaned up too


def test_corruption_is_detected_and_skipped(tmp_path):
    model, optimizer = _trained()
    save_dist_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    newest = save_dist_checkpoint(tmp_path, 2, model=model, optimizer=optimizer)
    shard = next((newest / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor
    shard.write_bytes(bytes(data))
    with pytest.raises(DistCheckpointError, match="checksum mismatch in dcp/"):
        verify_dist_checkpoint(newest)
    with pytest.raises(DistCheckpointError, match="checksum mismatch"):
        load_dist_checkpoint(newest, model=model, optimizer=optimizer)
    assert latest_dist_checkpoint(tmp_path).name == "step_00000001"
    (newest / "manifest.json").unlink()
    with pytest.raises(DistCheckpointError, match="no manifest.json"):
        verify_dist_checkpoint(newest)


def test_wrong_model_is_a_clear_error(tmp_path):
    model, optimizer = _trained()
    path = save_dist_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    bigger = Qwen2ForCausalLM(Qwen2Config(vocab_size=h.VOCAB, hidden_size=48, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(DistCheckpointError, match="does not fit"):
        load_dist_checkpoint(path, model=bigger)


def test_bad_arguments(tmp_path):
    model, optimizer = _trained()
    with pytest.raises(ValueError, match="step"):
        save_dist_checkpoint(tmp_path, -1, model=model)
    with pytest.raises(ValueError, match="keep"):
        save_dist_checkpoint(tmp_path, 1, model=model, keep=0)
    path = save_dist_checkpoint(tmp_path, 1, model=model)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format"] = "other"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DistCheckpointError, match="format"):
        verify_dist_checkpoint(path)
