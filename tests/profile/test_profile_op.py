"""`fusedrl profile OP`: every op's CPU smoke mode, shapes, ceilings columns, trace and JSON, CLI errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fusedrl.profile import main
from fusedrl.profile.op import traffic_bytes
from fusedrl.profile.ops import OPS, parse_dtype, parse_shape

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(out: str) -> dict:
    """{(provider, mode): status} of the printed table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[-1] == "ok" and parts[1] in ("forward", "backward", "full"):
            rows[(parts[0], parts[1])] = line
    return rows


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_smoke_passes_with_ceilings(op, capsys):
    assert main([op, "--smoke", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert ("fusedrl", "forward") in _rows(out), out
    assert "ceilings measured now: matmul" in out and "GB/s" in out and out.count("peers: trl") == 1


def test_backward_trace_and_json(tmp_path, capsys):
    trace, rows_path = tmp_path / "t.json", tmp_path / "rows.json"
    assert main(["linear_logprobs", "--smoke", "--backward", "--shape", "N=17,H=9,V=301", "--trace", str(trace),
                 "--json", str(rows_path)]) == 0
    out = capsys.readouterr().out
    assert {("fusedrl", m) for m in ("forward", "backward", "full")} <= set(_rows(out))
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"fusedrl.linear_logprobs", "provider:fusedrl"} <= names
    data = json.loads(rows_path.read_text())
    assert data["shape"] == {"N": 17, "H": 9, "V": 301} and data["modes"] == ["forward", "backward", "full"]
    ours = {r["mode"]: r for r in data["rows"] if r["provider"] == "fusedrl"}
    full = ours["full"]
    assert full["pct_matmul"] == pytest.approx(100 * full["tflops"] / data["matmul_ceiling_tflops"])
    assert full["pct_copy"] == pytest.approx(100 * full["gbps"] / data["copy_ceiling_gbps"])
    assert full["tflops"] == pytest.approx(6 * 17 * 9 * 301 / (full["ms_p50"] * 1e-3) / 1e12)
    trl = [r for r in data["rows"] if r["provider"].startswith("trl chunked head")]
    assert trl and all(r["status"] == "ok" for r in trl), trl


def test_parse_shape_forms_and_errors():
    spec = OPS["linear_logprobs"]
    assert parse_shape(spec, "N=5, v=7") == {**spec.default, "N": 5, "V": 7}
    assert parse_shape(spec, "5x6x7") == {"N": 5, "H": 6, "V": 7}
    assert parse_shape(spec, "", smoke=True) == spec.smoke
    for bad, match in (("5x6", "takes 3 sizes"), ("Q=3", "no size 'Q'"), ("N=abc", "integer"), ("N=0", ">= 1")):
        with pytest.raises(ValueError, match=match):
            parse_shape(spec, bad)
    assert parse_dtype("BF16") is torch.bfloat16 and parse_dtype("float64") is torch.float64
    with pytest.raises(ValueError, match="--dtype"):
        parse_dtype("int8")


def test_cli_errors_exit_2(capsys):
    for argv in (["kl", "--shape", "Z=3"], ["varlen_attention", "--smoke", "--shape", "HQ=3,HKV=2"],
                 ["policy_loss", "--smoke", "--shape", "N=4,B=9"], ["nosuchop"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    assert "--shape" in capsys.readouterr().err


def test_traffic_bytes_counts_inputs_outputs_and_grads():
    inputs = {"a": torch.zeros(10, requires_grad=True), "b": torch.zeros(4, dtype=torch.float64), "n": 3}
    out = traffic_bytes(inputs, [torch.zeros(2)])
    assert out == {"forward": 40 + 32 + 8, "backward": 40 + 32 + 8 + 40, "full": 80 + 120}


def test_fusedrl_profile_list_from_any_directory(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fusedrl", "profile", "--list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == list(OPS)
