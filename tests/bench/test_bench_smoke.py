"""Every bench's CPU smoke mode runs and passes (`fusedrl bench --smoke`), and the provider list shows versions."""
import pytest

from fusedrl.bench import run_all


@pytest.mark.parametrize("name", sorted(run_all.discover()))
def test_bench_smoke(name, capsys):
    assert run_all.main(["--only", name, "--smoke"]) == 0
    out = capsys.readouterr().out
    assert f"run_all: {name:<12} ok" in out
    assert out.splitlines()[0].startswith("peers: trl ")


@pytest.mark.parametrize("name", ["logprobs", "attention"])
def test_bench_cpu_cases_smoke(name, capsys):
    """The --device cpu cases (exact CPU paths vs eager), at smoke sizes."""
    assert run_all.main(["--only", name, "--smoke", "--device", "cpu"]) == 0
    assert f"run_all: {name:<12} ok" in capsys.readouterr().out
