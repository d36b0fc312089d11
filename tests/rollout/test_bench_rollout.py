"""bench_rollout --smoke runs on the CPU: every provider checked and timed, a summary with the ratio."""
import pytest
import torch

from fusedrl.bench import bench_rollout


def test_smoke_runs_and_reports_ratios(capsys, tmp_path):
    assert bench_rollout.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fusedrl native" in out and "fusedrl hf" in out and "transformers generate" in out
    assert "x transformers generate" in out
    assert list(tmp_path.glob("rollout-*.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's skip row")
def test_gpu_cases_are_skipped_with_a_reason_without_cuda():
    rows = bench_rollout.run_rollout_case("ROLLOUT-0.5B", bench_rollout.CASES["ROLLOUT-0.5B"], 1)
    assert rows[0]["status"].startswith("skipped")
