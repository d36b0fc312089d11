"""The shared bench runner on CPU: correctness gate, rows, table and JSON."""
import json

import torch

from bench.common import Case, Provider, format_table, run_case, write_results


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
