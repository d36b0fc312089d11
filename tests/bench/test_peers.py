"""Bench peers: TRL's chunked log-prob head against float64, its absence reported, peer versions listed."""
from importlib import metadata

import pytest
import torch

from fusedrl.bench import peers


def _inputs(n=37, h=11, v=523, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return {"hidden": torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True),
            "weight": torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True),
            "labels": torch.randint(0, v, (n,), generator=g)}


def test_trl_chunked_head_matches_float64_forward_and_backward():
    pytest.importorskip("trl")
    provider = peers.trl_chunked_provider()
    assert provider.fn is not None, provider.reason
    assert provider.name == f"trl chunked head ({metadata.version('trl')})"
    inputs = _inputs()
    out = provider.fn(inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
    grads = torch.autograd.grad(out, (inputs["hidden"], inputs["weight"]), upstream)
    h, w, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    ref = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None])[:, 0]
    ref_grads = torch.autograd.grad(ref, (h, w), upstream)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)  # TRL accumulates in float32
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_trl_absent_is_a_skipped_provider_with_the_reason(monkeypatch):
    monkeypatch.setattr(peers, "_distribution_version", lambda dist, module: None)
    provider = peers.trl_chunked_provider()
    assert provider.fn is None and provider.reason == "trl not installed"


def test_trl_chunk_size_is_the_trainers_value():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    assert peers.trl_chunk_size() == getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", peers.TRL_CHUNK_DEFAULT)


def test_peer_versions_line_names_each_peer():
    versions = peers.peer_versions()
    assert list(versions) == ["trl", "liger-kernel", "cut-cross-entropy", "flash-attn", "flex-attention"]
    for dist in ("trl", "liger-kernel", "cut-cross-entropy", "flash-attn"):
        try:
            assert versions[dist] == metadata.version(dist)
        except metadata.PackageNotFoundError:
            assert versions[dist] == "absent"
    line = peers.format_peer_versions({"trl": "1.0", "flash-attn": "absent"})
    assert line == "peers: trl 1.0, flash-attn absent"


def test_logprobs_bench_lists_the_trl_head():
    from fusedrl.bench import bench_logprobs

    names = [p.name for p in bench_logprobs.providers("cpu")] + [p.name for p in bench_logprobs.cpu_providers()]
    assert sum(name.startswith("trl chunked head") for name in names) == 2


def test_grpo_bench_trl_path_matches_the_reference():
    pytest.importorskip("trl")
    from fusedrl.bench import bench_grpo
    from fusedrl.bench.common import run_case

    case = bench_grpo.make_case("toy", (2, 5, 8, 37), torch.float64, "cpu")
    case.tol = 1e-5
    rows = run_case(case, [bench_grpo.trl_provider()], modes=("full",))
    assert rows[0]["status"] == "ok" and rows[0]["provider"].startswith("trl chunked head + eager loss"), rows
