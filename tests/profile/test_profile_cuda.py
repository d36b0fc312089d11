"""The GPU paths of profiling (bench/gpu_check.sh runs them): CUDA traces, NVTX, ceilings, synced phases."""
import json
import os

import pytest
import torch

from fusedrl.kernels import _ranges

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "examples", "data")


def test_cuda_trace_has_op_range_and_its_kernels(tmp_path):
    from fusedrl.kernels import linear_logprobs

    g = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(257, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1031, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1031, (257,), device="cuda", generator=g)
    linear_logprobs(hidden, weight, labels).sum().backward()  # compile outside the trace
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        linear_logprobs(hidden, weight, labels).sum().backward()
        torch.cuda.synchronize()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    assert any(e.get("name") == "fusedrl.linear_logprobs" for e in events)
    assert any(e.get("cat") == "kernel" for e in events)


def test_nvtx_ranges_run_on_cuda():
    from fusedrl.kernels import kl_penalty

    _ranges.set_nvtx(True)
    try:
        x = torch.randn(100, device="cuda")
        with _ranges.phase_range("probe"):
            out = kl_penalty(x, x + 0.1, "k3")
        torch.cuda.synchronize()
    finally:
        _ranges.set_nvtx(False)
    assert torch.isfinite(out).all()


def test_profile_op_cuda_ceilings_and_percentages(tmp_path):
    from fusedrl.profile import main

    rows_path = tmp_path / "rows.json"
    assert main(["linear_logprobs", "--device", "cuda", "--shape", "N=2048,H=896,V=32768", "--backward",
                 "--json", str(rows_path), "--trace", str(tmp_path / "t.json")]) == 0
    data = json.loads(rows_path.read_text())
    assert data["matmul_ceiling_tflops"] > 10 and data["copy_ceiling_gbps"] > 100
    ours = [r for r in data["rows"] if r["provider"] == "fusedrl" and r["status"] == "ok"]
    assert len(ours) == 3 and all(0 < r["pct_matmul"] < 150 for r in ours)


def test_profile_run_on_cuda_syncs_phases(tmp_path):
    from fusedrl.profile import run as prun

    argv = [os.path.join(ROOT, "examples", "grpo_tiny.toml"), f"--data.train={DATA}/prompts_train.jsonl",
            f"--data.eval={DATA}/prompts_eval.jsonl", "--run.device=cuda", "--steps", "2", "--out",
            str(tmp_path / "run")]
    assert prun.main(argv) == 0
    report = json.loads((tmp_path / "run" / "profile" / "phases.json").read_text())
    phases = {r["phase"] for r in report["phases"]}
    assert {"generate", "forward_backward", "optimizer"} <= phases
    assert any(k["self_device_ms"] > 0 for k in report["kernels"])
