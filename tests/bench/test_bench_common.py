"""The shared bench runner on CPU: correctness gate, rows, table and JSON."""
import json
import os

import pytest
import torch

from fusedrl.bench.common import (Case, Provider, bench_arg_parser, bench_device, finish, format_table, parse_bench_args,
                          run_case, write_results)


def _case():
    def make():
        g = torch.Generator().manual_seed(0)
        return {"x": torch.randn(7, 5, generator=g, requires_grad=True)}

    return Case(id="toy", make_inputs=make, reference=lambda i: (i["x"].double() ** 2).sum(-1),
                flops={"full": 100.0})


def test_run_case_times_good_and_flags_wrong_and_skipped(tmp_path):
    providers = [
        Provider("good", lambda i: (i["x"] ** 2).sum(-1)),
        Provider("wrong", lambda i: (i["x"] ** 3).sum(-1)),
        Provider("absent", None, reason="not installed"),
    ]
    rows = run_case(_case(), providers, modes=("forward", "backward", "full"))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert {m for (p, m) in by if p == "good"} == {"forward", "backward", "full"}
    assert by[("good", "full")]["status"] == "ok" and by[("good", "full")]["tflops"] > 0
    assert by[("wrong", "-")]["status"].startswith("wrong")
    assert by[("absent", "-")]["status"] == "skipped: not installed"
    table = format_table(rows)
    assert "good" in table and "wrong" in table
    path = write_results("toy", rows, directory=str(tmp_path))
    data = json.load(open(path))
    assert data["bench"] == "toy" and data["torch"] == torch.__version__ and len(data["rows"]) == len(rows)


def test_bench_cli_parses_cases_and_rejects_unknown(capsys):
    parser = bench_arg_parser("bench_toy", "Toy bench.\nmore", ("A", "B"))
    args, cases = parse_bench_args(parser, ["--smoke", "--cases", " B,"], ("A", "B"))
    assert args.smoke and cases == ["B"] and args.modes == "forward,full" and args.results_dir is None
    assert parse_bench_args(parser, [], ("A", "B"))[1] == ["A", "B"]
    with pytest.raises(SystemExit) as exc:
        parse_bench_args(parser, ["--cases", "A,C"], ("A", "B"))
    assert exc.value.code == 2 and "unknown case(s) ['C']; choose from ('A', 'B')" in capsys.readouterr().err
    assert bench_device("bench_toy", smoke=True) == "cpu"


def test_finish_prints_writes_only_when_asked_and_sets_exit_code(tmp_path, capsys):
    rows = [{"case": "toy", "provider": "ours", "mode": "-", "status": "skipped: absent"},
            {"case": "toy", "provider": "peer", "mode": "-", "status": "wrong (rel err 1e+00 > 2e-02)"}]
    parser = bench_arg_parser("bench_toy", "Toy bench.", ("toy",))
    smoke, _ = parse_bench_args(parser, ["--smoke"], ("toy",))
    assert finish("toy", rows[:1], smoke, after_table="SUMMARY") == 0
    out = capsys.readouterr().out
    assert out.index("provider") < out.index("SUMMARY") and "wrote" not in out
    assert finish("toy", rows, smoke) == 1  # a wrong peer fails by default
    assert finish("toy", rows, smoke, is_failure=lambda r: r["provider"] == "ours" and r["status"] != "ok") == 1
    assert finish("toy", rows[1:], smoke, is_failure=lambda r: r["provider"] == "ours") == 0
    written, _ = parse_bench_args(parser, ["--smoke", "--results-dir", str(tmp_path)], ("toy",))
    finish("toy", rows, written, extra={"k": 3})
    (name,) = os.listdir(tmp_path)
    data = json.load(open(tmp_path / name))
    assert data["smoke"] is True and data["k"] == 3 and len(data["rows"]) == 2


def test_ceilings_give_percentage_column():
    from fusedrl.bench.common import copy_ceiling_gbps, matmul_ceiling_tflops

    tflops, gbps = matmul_ceiling_tflops("cpu"), copy_ceiling_gbps("cpu")
    assert tflops > 0 and gbps > 0
    rows = run_case(_case(), [Provider("good", lambda i: (i["x"] ** 2).sum(-1))], modes=("full",),
                    ceiling_tflops=1e-9)
    (row,) = rows
    assert row["pct_ceiling"] == 100.0 * row["tflops"] / 1e-9
    assert "%ceil" in format_table(rows)
