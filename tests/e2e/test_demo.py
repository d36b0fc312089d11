"""`fusedrl demo --quick`: a run folder with a report, plots and metrics, and the task score rises."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fusedrl.cli import main
from fusedrl.config import load_config
from fusedrl.demo.pipeline import DEFAULT_STAGES, DemoConfig, default_demo_config
from fusedrl.train.plot import read_png

ROOT = Path(__file__).resolve().parents[2]


def test_demo_quick_runs_the_pipeline_and_raises_the_task_score(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--logging.progress=false"]) == 0
    scores = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in scores] == ["init", *DEFAULT_STAGES]
    assert scores[1]["task_score"] > scores[0]["task_score"] + 0.05, scores
    assert scores[-1]["task_score"] > scores[0]["task_score"] + 0.3, scores
    for stage in DEFAULT_STAGES[1:]:
        assert f"| {stage} |" in (out / "report.md").read_text(), stage
        assert (out / stage / "metrics.jsonl").exists(), stage

    report = (out / "report.md").read_text()
    assert "## Task score by stage" in report
    # the distill step (last): a student with half the final policy's layers scores higher after distillation
    row = next(line for line in report.splitlines() if line.startswith("| distill |"))
    numbers = dict(re.findall(r"(student before|student score) ([0-9.]+)", row))
    assert float(numbers["student score"]) > float(numbers["student before"]) + 0.04, row
    assert f"| distill | {scores[-1]['task_score']:.3f} |" in report and scores[-1] == {**scores[-2], "step": 7,
                                                                                            "stage": "distill"}
    assert f"| sft | {scores[1]['task_score']:.3f} |" in report
    assert f"| init (untrained) | {scores[0]['task_score']:.3f} |" in report
    # task_score.png is a line_plot; a stage's per-metric PNGs are the panels of its overview figure
    for image, shape in (("plots/task_score.png", (400, 640, 3)), ("sft/plots/loss.png", (290, 420, 3)),
                         ("sft/plots/eval_task_score.png", (290, 420, 3))):
        assert f"]({image})" in report, image
        pixels = read_png(out / image)
        assert pixels.shape == shape and (pixels != 255).any(axis=2).mean() > 0.01, image

    sft = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in sft if r["kind"] == "eval"]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert (out / "sft" / "final" / "model.safetensors").exists()
    assert np.isfinite([r["loss"] for r in sft if r["kind"] == "train"]).all()


def test_examples_parse_and_demo_toml_equals_the_built_in_config():
    assert load_config(ROOT / "examples" / "demo.toml", cls=DemoConfig) == default_demo_config()
    for name in ("sft_qwen2_0.5b.toml", "sft_tiny.toml"):
        cfg = load_config(ROOT / "examples" / name)
        assert cfg.run.stage == "sft"


def test_cli_bench_config_and_errors(tmp_path, capsys, caplog):
    assert main(["bench", "--list"]) == 0
    assert "logprobs" in capsys.readouterr().out
    assert main(["config"]) == 0
    assert "[optim]" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[loop]\nmax_steps = 'many'\n")
    assert main(["train", str(bad)]) == 2
    assert "loop.max_steps: expected int" in caplog.text
    bad.write_text("[loop]\nmax_steps = 3\n")
    assert main(["train", str(bad), "--optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in caplog.text


def test_train_picks_the_config_class_of_the_stage(tmp_path, monkeypatch):
    from dataclasses import dataclass, field

    from fusedrl import stages
    from fusedrl.config import TrainConfig
    from fusedrl.train.run import load_run_config

    @dataclass
    class ExtraTable:
        beta: float = 0.1
        """A stage option."""

    @dataclass
    class ExtraConfig(TrainConfig):
        extra: ExtraTable = field(default_factory=ExtraTable)

    monkeypatch.setitem(stages.STAGES, "extra", stages.STAGES["sft"])
    monkeypatch.setitem(stages.STAGE_CONFIGS, "extra", ExtraConfig)
    path = tmp_path / "run.toml"
    path.write_text('[run]\nstage = "extra"\n[extra]\nbeta = 0.5\n')
    cfg = load_run_config(str(path), [("extra.beta", "0.25")])
    assert isinstance(cfg, ExtraConfig) and cfg.extra.beta == 0.25
    with pytest.raises(ValueError, match="unknown config key 'extra'"):
        load_run_config(str(path), [("run.stage", "sft")])
    with pytest.raises(ValueError, match="run.stage: expected one of"):
        load_run_config(str(path), [("run.stage", "nope")])
