"""`fusedrl profile run CONFIG --steps N`: phases, fused ops and kernels of real training steps (CPU smoke)."""
import json
import os

import pytest

from fusedrl.profile import run as prun

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "examples", "data")


def _grpo_argv(tmp_path, *extra):
    return [os.path.join(ROOT, "examples", "grpo_tiny.toml"), f"--data.train={DATA}/prompts_train.jsonl",
            f"--data.eval={DATA}/prompts_eval.jsonl", "--rollout.prompts_per_rollout=2", "--rollout.group_size=2",
            "--pg.beta=0.04", *extra]


def test_profile_run_grpo_reports_phases_ops_and_kernels(tmp_path, capsys):
    from fusedrl.cli import main as cli_main

    out_dir, trace = tmp_path / "run", tmp_path / "trace.json"
    argv = ["profile", "run", *_grpo_argv(tmp_path, "--steps", "2", "--warmup", "1", "--out", str(out_dir),
                                          "--top", "5", "--trace", str(trace))]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out_dir / "profile" / "phases.json").read_text())
    phases = {r["phase"]: r for r in report["phases"]}
    for name in ("step", "batches", "generate", "score", "logprobs", "forward_backward", "optimizer"):
        assert name in phases and name in printed, name
    assert phases["step"]["calls"] == 2 and phases["optimizer"]["calls"] == 2  # the warm-up step is not counted
    assert phases["step"]["pct_of_step"] == pytest.approx(100.0)
    top = sum(phases[p]["ms_per_step"] for p in ("batches", "forward_backward", "optimizer", "other"))
    assert top == pytest.approx(phases["step"]["ms_per_step"]) and phases["other"]["ms_per_step"] >= 0
    assert phases["generate"]["ms_per_step"] <= phases["batches"]["ms_per_step"] <= phases["step"]["ms_per_step"]
    ops = {r["op"] for r in report["ops"]}
    assert {"varlen_attention", "linear_logprobs"} <= ops and ({"linear_policy_loss", "policy_loss"} & ops)
    assert len(report["kernels"]) == 5 and all(not k["name"].startswith("fusedrl.") for k in report["kernels"])
    assert "Self CPU" in (out_dir / "profile" / "kernels.txt").read_text()
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"fusedrl.phase.generate", "fusedrl.phase.forward_backward"} <= names


def test_profile_run_sft_without_warmup_uses_a_temp_folder(tmp_path, capsys):
    argv = [os.path.join(ROOT, "examples", "sft_tiny.toml"), f"--data.train={DATA}/sft_train.jsonl",
            f"--data.eval={DATA}/sft_eval.jsonl", "--steps", "1", "--warmup", "0"]
    assert prun.main(argv) == 0
    printed = capsys.readouterr().out
    folder = printed.rsplit("wrote ", 1)[1].split("/phases.json")[0]
    try:
        report = json.loads(open(os.path.join(folder, "phases.json")).read())
        phases = {r["phase"]: r["calls"] for r in report["phases"]}
        assert phases["step"] == 1 and phases["forward_backward"] >= 1 and "generate" not in phases
        assert os.path.basename(os.path.dirname(folder)).startswith("fusedrl-profile-")
    finally:
        import shutil
        shutil.rmtree(os.path.dirname(folder), ignore_errors=True)


def test_bad_arguments_exit_2(tmp_path):
    toml = os.path.join(ROOT, "examples", "sft_tiny.toml")
    for argv in ([toml, "--steps", "0"], [toml, "--warmup", "-1"], [toml, "--loop.nosuchkey=3"]):
        with pytest.raises(SystemExit) as exc:
            prun.main(argv)
        assert exc.value.code == 2, argv


def test_missing_config_and_bad_data_are_one_line_errors(tmp_path, capsys):
    from fusedrl.cli import main as cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["profile", "run", str(tmp_path / "absent.toml"), "--steps", "1"])
    assert exc.value.code == 2 and "absent.toml" in capsys.readouterr().err
    argv = [os.path.join(ROOT, "examples", "sft_tiny.toml"), f"--data.train={tmp_path}/none.jsonl", "--steps", "1",
            "--out", str(tmp_path / "run")]
    assert cli_main(["profile", "run", *argv]) == 2  # a data error from the training entry point: exit 2


class _FakeProf:
    def __init__(self):
        self.calls = []

    def start(self):
        self.calls.append("start")

    def stop(self):
        self.calls.append("stop")


def test_window_profiles_exactly_the_steps_after_warmup():
    prof = _FakeProf()
    window = prun._Window(prof, warmup=2, steps=3)
    seen = []
    for step in range(1, 7):
        window(step, {})
        seen.append(list(prof.calls))
    assert seen == [[], ["start"], ["start"], ["start"], ["start", "stop"], ["start", "stop"]]
    assert prun._Window(_FakeProf(), warmup=0, steps=1).prof.calls == ["start"]
