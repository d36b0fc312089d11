"""Security: a model folder's code runs only with model.trust_remote_code = true (never on a "y" piped
to stdin); every file the engine loads refuses a pickled payload (weights_only=True / safetensors);
data files never name code; an imported verifier's file is logged."""
import io
import json
import logging
import sys

import pytest
import torch

from fusedrl.config import TrainConfig
from fusedrl.models.causal_lm import build_model
from fusedrl.train.optim import build_optimizer
from fusedrl.stages.cache import load_tensors
from fusedrl.train.checkpoint import CheckpointError, _sha256, list_checkpoints, load_checkpoint

from tests.robustness._helpers import ROOT, argv, assert_one_line_error, cli, snapshot

TINY = {"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64, "max_position_embeddings": 32}


class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _code_folder(tmp_path, marker):
    folder = tmp_path / "custom_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, "model_type": "customnet", "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_custom.py").write_text(code)
    (folder / "modeling_custom.py").write_text(code)
    return folder


def test_a_model_folders_code_is_refused_even_with_yes_on_stdin(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "RAN"
    folder = _code_folder(tmp_path, marker)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))
    out = tmp_path / "run"
    assert_one_line_error(*cli(argv("sft_tiny", out, f"--model.name_or_path={folder}"), capsys),
                          "model.name_or_path", "model.trust_remote_code")
    assert not marker.exists() and not out.exists()
    with pytest.raises(ValueError, match="trust_remote_code"):
        from fusedrl.models.scalar_head import ScalarHeadModel
        ScalarHeadModel.from_pretrained(folder)
    assert not marker.exists()


def test_a_pickled_payload_in_any_checkpoint_file_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv("sft_tiny", out), capsys)[0] == 0
    marker = tmp_path / "RAN"
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    model = build_model(name_or_path=out / "final", device="cpu")
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "stage.pt"):
        original = (ckpt / name).read_bytes()
        torch.save(Payload(marker), ckpt / name)
        manifest = json.loads((ckpt / "manifest.json").read_text())  # checksums updated: only the pickle stops it
        manifest["files"][name] = _sha256(ckpt / name)
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
        optimizer = build_optimizer(model, TrainConfig().optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        with pytest.raises(CheckpointError, match=name.split(".")[0]):
            load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        assert not marker.exists(), name
        if name == "optimizer.pt":  # through the CLI: one line, folder unchanged
            for older in list_checkpoints(out / "checkpoints")[:-1]:
                (older / "trainer.json").write_text("{}")  # checksum mismatch: the newest is the only candidate
            before = snapshot(out)
            code, errors, err = cli(argv("sft_tiny", out, "--resume", "--loop.max_steps=3"), capsys)
            assert code == 2 and not marker.exists(), err
            assert "Traceback" not in err and len(errors) == 1 and "optimizer.pt" in errors[0], err
            assert snapshot(out) == before  # config.toml and run.json restored, lock released
        (ckpt / name).write_bytes(original)
        manifest["files"][name] = _sha256(ckpt / name)
        (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_a_pickled_payload_in_a_cache_or_model_file_is_refused(tmp_path):
    marker = tmp_path / "RAN"
    cache = tmp_path / "ref_logp_x.safetensors"
    torch.save(Payload(marker), cache)
    assert load_tensors(cache) is None and not marker.exists()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, "architectures": ["Qwen2ForCausalLM"]}))
    torch.save(Payload(marker), folder / "pytorch_model.bin")
    with pytest.raises(Exception):
        build_model(name_or_path=folder, device="cpu")
    assert not marker.exists()


def test_data_files_never_name_code(tmp_path, capsys, monkeypatch):
    """A record's fields are data: a "verifier" or "module:function" value in a record is never imported."""
    marker = tmp_path / "RAN"
    (tmp_path / "evil_records_mod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                  "def boom(prompt, completion, **kw):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [json.loads(line) for line in (ROOT / "examples/data/prompts_train.jsonl").read_text().splitlines()[:16]]
    for row in rows:
        row.update(verifier="evil_records_mod:boom", reward_model="evil_records_mod", module="evil_records_mod")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(argv("grpo_tiny", tmp_path / "run", f"--data.train={data}", "--data.eval=none", "--loop.max_steps=1",
                            "--checkpoint.every=0", data=False), capsys)
    assert code == 0, err
    assert not marker.exists() and "evil_records_mod" not in sys.modules


def test_an_imported_verifier_logs_its_file(caplog):
    from fusedrl.rollout.rewards import load_verifier
    with caplog.at_level(logging.INFO, logger="fusedrl"):
        load_verifier("fusedrl.rollout.rewards:exact_match")
    assert "runs code from" in caplog.text and "rewards.py" in caplog.text
