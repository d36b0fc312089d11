"""The SFT stage: its loss equals the unpacked per-sequence NLL, it learns, and it runs under the loop."""
import json

import pytest
import torch

from fusedrl.config import TrainConfig
from fusedrl.data.records import PackedDataset, tokenize_records
from fusedrl.train.metrics import read_metrics
from fusedrl.data.tokenizer import build_tokenizer
from fusedrl.models.causal_lm import build_policy
from fusedrl.train.run import run_training, seed_everything
from fusedrl.stages.base import Stage
from fusedrl.stages.sft import SFTStage
from fusedrl.demo.tasks import make_records

ARCH = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": True}


def _cfg(tmp_path, **loop):
    cfg = TrainConfig()
    cfg.run.out_dir, cfg.run.device = str(tmp_path / "run"), "cpu"
    cfg.model.tokenizer, cfg.model.arch = "char", dict(ARCH)
    cfg.data.max_len, cfg.data.token_budget = 48, 256
    cfg.optim.lr, cfg.schedule.warmup_steps = 1e-2, 3
    cfg.logging.progress = False
    for key, value in loop.items():
        setattr(cfg.loop, key, value)
    return cfg


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("normalize_by", ["tokens", "sequences"])
def test_sft_loss_equals_unpacked_per_sequence_nll(tmp_path, seed, normalize_by):
    cfg = _cfg(tmp_path)
    tokenizer = build_tokenizer(cfg.model)
    model = build_policy(cfg.model, tokenizer, torch.device("cpu"))
    examples, _ = tokenize_records(make_records("reverse", 5, seed=1), tokenizer, max_len=48)
    dataset = PackedDataset(examples, 256, seed=0, shuffle=False)
    stage = SFTStage(dataset, normalize_by=normalize_by)
    assert isinstance(stage, Stage)
    (batch,) = stage.micro_batches(model, 0)
    assert batch.num_seqs == 5
    normalizer = batch.num_tokens if normalize_by == "tokens" else batch.num_seqs
    loss, _ = stage.loss(model, batch, normalizer)

    total_nll = 0.0
    with torch.no_grad():
        for example in examples:  # one unpadded sequence at a time through the stock forward
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor([example.labels])
            out = model(input_ids=ids, labels=labels)
            total_nll += out.loss.item() * example.num_trained  # HF returns the token mean
    assert loss.item() == pytest.approx(total_nll / normalizer, rel=1e-4)


def test_sft_lowers_the_loss_through_the_loop(tmp_path, seed):
    records = make_records("reverse", 64, seed=2, max_len=3)
    cfg = _cfg(tmp_path, max_steps=40, eval_every=20, eval_at_start=True)
    cfg.data.train = _write(tmp_path / "train.jsonl", records)
    cfg.data.eval = _write(tmp_path / "eval.jsonl", make_records("reverse", 16, seed=3, max_len=3))
    cfg.data.micro_batches_per_step = 2
    result = run_training(cfg)
    evals = [r["eval/loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 3 and evals[-1] < 0.6 * evals[0], evals
    assert result.state.step == 40 and result.last_metrics["micro_batches"] == 2
    run = tmp_path / "run"
    assert (run / "final" / "model.safetensors").exists() and (run / "final" / "tokenizer.json").exists()
    assert (run / "plots" / "loss.png").exists() and "## Metrics" in (run / "report.md").read_text()
    assert (run / "config.toml").exists()


def test_sft_config_errors_name_the_key(tmp_path):
    cfg = _cfg(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="data.train"):
        run_training(cfg)
    cfg.data.train = _write(tmp_path / "train.jsonl", make_records("reverse", 4, seed=2))
    cfg.data.token_budget = 8
    with pytest.raises(ValueError, match="data.token_budget: 8 is smaller than the longest example"):
        run_training(cfg)
