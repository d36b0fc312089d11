"""The training loop with a fake stage: accumulation, non-finite handling, schedule, eval, logging."""
import copy
import json
import math

import pytest
import torch

from fusedrl.config import TrainConfig
from fusedrl.train.loop import NonFiniteError, build_optimizer, global_normalizer, lr_factor, train, train_step
from fusedrl.train.metrics import read_metrics

from tests.helpers.fake_stage import FakeStage, TinyLM, make_batch, random_docs


def _cfg(steps=4, **loop):
    cfg = TrainConfig()
    cfg.loop.max_steps = steps
    cfg.optim.lr = 1e-2
    cfg.logging.progress = False
    cfg.schedule.decay = "constant"
    for key, value in loop.items():
        setattr(cfg.loop, key, value)
    return cfg


class ListStage(FakeStage):
    """Serves fixed lists of micro-batches per step."""

    def __init__(self, steps, normalize_by="tokens"):
        super().__init__(normalize_by=normalize_by)
        self.steps = steps

    def micro_batches(self, model, step):
        self.current_step = step
        return self.steps[step]


@pytest.mark.parametrize("normalize_by", ["tokens", "sequences"])
def test_accumulation_over_four_micro_batches_equals_one_batch(seed, normalize_by):
    generator = torch.Generator().manual_seed(7)
    # Unequal micro-batches (1..4 documents of different lengths): a per-micro-batch mean would differ.
    groups = [random_docs(generator, n, 2, 12) for n in (1, 2, 3, 4)]
    micro = [make_batch(g) for g in groups]
    full = make_batch([doc for g in groups for doc in g])
    assert len({b.num_tokens for b in micro}) > 1

    model_a = TinyLM()
    model_b = copy.deepcopy(model_a)
    model_init = copy.deepcopy(model_a)
    opt_a = build_optimizer(model_a, TrainConfig().optim)
    opt_b = build_optimizer(model_b, TrainConfig().optim)
    device = torch.device("cpu")
    rec_a = train_step(model_a, ListStage([micro], normalize_by), micro, opt_a, None, device)
    rec_b = train_step(model_b, ListStage([[full]], normalize_by), [full], opt_b, None, device)
    assert rec_a["loss"] == pytest.approx(rec_b["loss"], rel=1e-6)
    assert rec_a["grad_norm"] == pytest.approx(rec_b["grad_norm"], rel=1e-5)
    assert rec_a["trained_tokens"] == full.num_tokens
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    # Normalising each micro-batch by its own count instead would give a different loss.
    naive = sum(ListStage([micro], normalize_by).loss(model_init, b, b.num_tokens if normalize_by == "tokens"
                                                      else b.num_seqs)[0].item() for b in micro) / 4
    assert abs(naive - rec_b["loss"]) > 1e-3


def test_global_normalizer_counts_tokens_or_sequences():
    batches = [make_batch([[1, 2, 3], [4, 5]]), make_batch([[6, 7, 8, 9]])]
    assert global_normalizer(batches, "tokens", torch.device("cpu")) == 2 + 1 + 3
    assert global_normalizer(batches, "sequences", torch.device("cpu")) == 3
    with pytest.raises(ValueError, match="normalize_by"):
        global_normalizer(batches, "docs", torch.device("cpu"))


def test_loss_decreases_and_jsonl_has_one_line_per_step(tmp_path, seed):
    cfg = _cfg(steps=30, eval_every=10, eval_at_start=True)
    model = TinyLM()
    stage = FakeStage(per_step=2)
    result = train(model, stage, cfg, run_dir=tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.2
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "memory_gb", "nll", "trained_tokens"):
        assert key in train_records[0], key
    assert result.state.step == 30 and result.state.skipped_steps == 0
    assert (tmp_path / "checkpoints" / "step_00000030" / "manifest.json").exists()


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, seed):
    model = TinyLM()
    stage = FakeStage(nan_steps={1, 2})
    weights = {}

    def snapshot(step, record):
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}

    result = train(model, stage, _cfg(steps=5, max_nonfinite_in_a_row=3), run_dir=tmp_path, on_step_end=snapshot)
    assert result.state.skipped_steps == 2 and result.state.nonfinite_in_a_row == 0
    for key in weights[1]:  # steps 2 and 3 (0-based 1, 2) changed nothing
        assert torch.equal(weights[1][key], weights[3][key])
        assert not torch.equal(weights[3][key], weights[4][key]) or key == "embed.weight"
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(records[1]["loss"]) and records[2]["skipped_steps"] == 2


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_error(tmp_path, seed):
    stage = FakeStage(nan_steps={2, 3, 4, 5})
    with pytest.raises(NonFiniteError, match="3 steps in a row had a non-finite loss"):
        train(TinyLM(), stage, _cfg(steps=10, max_nonfinite_in_a_row=3), run_dir=tmp_path)


@pytest.mark.parametrize("decay, expected", [
    # warmup 2, total 6, min ratio 0.1. Warm-up: (s+1)/2 -> 0.5, 1.0. Then p = (s-2)/3:
    # cosine: 0.1 + 0.9 * (1 + cos(pi p)) / 2 -> 1, 0.775, 0.325, 0.1
    ("cosine", [0.5, 1.0, 1.0, 0.775, 0.325, 0.1]),
    # linear: 0.1 + 0.9 * (1 - p) -> 1, 0.7, 0.4, 0.1
    ("linear", [0.5, 1.0, 1.0, 0.7, 0.4, 0.1]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_schedule_values(tmp_path, seed, decay, expected):
    got = [lr_factor(s, total_steps=6, warmup_steps=2, decay=decay, min_lr_ratio=0.1) for s in range(6)]
    assert got == pytest.approx(expected)
    cfg = _cfg(steps=6)
    cfg.schedule.warmup_steps, cfg.schedule.decay, cfg.schedule.min_lr_ratio = 2, decay, 0.1
    train(TinyLM(), FakeStage(), cfg, run_dir=tmp_path)
    logged = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert logged == pytest.approx([cfg.optim.lr * f for f in expected])


def test_gradient_clipping_limits_the_update(seed):
    batch = make_batch([[1, 2, 3, 4, 5]])
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    record = train_step(model, ListStage([[batch]]), [batch], opt, 0.01, torch.device("cpu"))
    after = torch.nn.utils.parameters_to_vector(model.parameters())
    assert record["grad_norm"] > 0.01  # the logged norm is the one before clipping
    assert (after - before).norm().item() == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_writes_a_checkpoint_and_stops(tmp_path, seed, signame):
    import os
    import signal

    previous = signal.getsignal(signal.SIGINT)

    def kill_at_3(step, record):
        if step == 3:
            os.kill(os.getpid(), getattr(signal, signame))

    result = train(TinyLM(), FakeStage(), _cfg(steps=10), run_dir=tmp_path, on_step_end=kill_at_3)
    assert result.interrupted and result.state.step == 3
    saved = json.loads((tmp_path / "checkpoints" / "step_00000003" / "trainer.json").read_text())
    assert saved["step"] == 3
    assert signal.getsignal(signal.SIGINT) is previous  # the loop's handlers are removed again


def test_a_stage_missing_parts_is_rejected_by_name(tmp_path):
    class Incomplete:
        name = "half"
        normalize_by = "tokens"

        def micro_batches(self, model, step):
            return []

    with pytest.raises(TypeError, match=r"stage: Incomplete lacks \['loss', 'state_dict', 'load_state_dict'\]"):
        train(TinyLM(), Incomplete(), _cfg(), run_dir=tmp_path)
