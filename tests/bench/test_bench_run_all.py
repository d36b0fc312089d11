"""fusedrl.bench.run_all: discovery, --list, --only with pass-through flags, failures reported; gpu_check.sh parses."""
import os
import subprocess
import sys

import pytest

from fusedrl.bench import run_all

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_discover_finds_bench_modules():
    benches = run_all.discover()
    assert benches["packing"] == "fusedrl.bench.bench_packing"
    assert all(module.startswith("fusedrl.bench.bench_") for module in benches.values())


def test_list(capsys):
    assert run_all.main(["--list"]) == 0
    assert "packing" in capsys.readouterr().out.split()


def test_only_packing_smoke_passes_flags_through(capsys):
    assert run_all.main(["--only", "packing", "--smoke", "--cases", "k8", "--n", "50"]) == 0
    out = capsys.readouterr().out
    assert "n=50" in out
    case_rows = [line.split()[0] for line in out.splitlines() if line.startswith(("k8", "k64", "budget"))]
    assert case_rows == ["k8"]
    assert "run_all: packing      ok" in out


def test_unknown_bench_is_an_error():
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nosuchbench"])


def test_failing_bench_is_reported_not_fatal(monkeypatch, capsys):
    monkeypatch.setattr(run_all, "discover", lambda: {"bad": "fusedrl.bench.no_such_module", "packing": "fusedrl.bench.bench_packing"})
    assert run_all.main(["--smoke", "--cases", "k8", "--n", "20"]) == 1
    out = capsys.readouterr().out
    assert "run_all: bad          import error: ModuleNotFoundError" in out
    assert "run_all: packing      ok" in out


def test_bad_bench_flag_fails_that_bench(capsys):
    assert run_all.main(["--only", "packing", "--cases", "nosuchcase"]) == 1
    assert "failed (return code 2)" in capsys.readouterr().out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "fusedrl.bench.run_all", "--list"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "packing" in proc.stdout.split()


def test_fusedrl_bench_runs_from_any_directory(tmp_path):
    """The benches ship inside the package: `python -m fusedrl bench` needs no source checkout as cwd."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fusedrl", "bench", "--list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "packing" in proc.stdout.split()


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
