"""parallel.py in one process: init without torchrun, config validation, AC/compile order, run_forward."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedrl.train.parallel import (ParallelConfig, apply_fsdp, decoder_layers, gathered_params, init_distributed,
                                    is_sharded, run_forward)
from tests.distributed import _dist_helpers as h

ROOT = Path(__file__).resolve().parents[2]


def test_single_process_needs_no_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.backend, info.is_rank0) == (0, 1, None, True)
    assert not torch.distributed.is_initialized()


def test_bad_environment_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed()
    with pytest.raises(ValueError, match="backend"):
        init_distributed(backend="mpi")


@pytest.mark.parametrize("kwargs, match", [
    (dict(dp_shard=0), "dp_shard"), (dict(dp_replicate=-1), "dp_replicate"), (dict(dp_shard=True), "dp_shard"),
    (dict(param_dtype="fp8"), "param_dtype"), (dict(timeout_s=0), "timeout_s")])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)


def test_apply_fsdp_needs_decoder_layers():
    with pytest.raises(ValueError, match="decoder layers"):
        apply_fsdp(torch.nn.Linear(3, 3), ParallelConfig())
    with pytest.raises(TypeError, match="ParallelConfig"):
        apply_fsdp(h.tiny_model(), {"dp_shard": 2})
    assert [type(m).__name__ for m in decoder_layers(h.tiny_model())] == ["Qwen2DecoderLayer"] * 2


def test_activation_checkpointing_keeps_loss_grads_and_names():
    def grads(cfg):
        model = h.tiny_model()
        names = [n for n, _ in model.named_parameters()]
        model = apply_fsdp(model, cfg).train()
        batch = h.pack(*h.global_batch(0)[:2])
        run_forward(model, h.sft_loss_sum, batch).backward()
        assert [n for n, _ in model.named_parameters()] == names  # checkpoints stay loadable
        return {n: p.grad for n, p in model.named_parameters()}, model

    plain, _ = grads(ParallelConfig())
    checkpointed, model = grads(ParallelConfig(activation_checkpointing=True))
    layers = decoder_layers(model)
    assert all(layer.gradient_checkpointing for layer in layers) and not is_sharded(model)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0)


def test_gathered_params_without_sharding_reports_no_extra():
    model = h.tiny_model()
    with gathered_params(model) as report:
        assert report.extra_bytes == 0 and report.full_bytes == sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.slow
def test_gpu_smoke_script_runs_on_cpu():
    # The script bench/gpu_check.sh runs on a GPU, checked here with gloo (world size 1 under torchrun).
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                          "-m", "tests.distributed.gpu_smoke", "--cpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    for check in ("fp32 fsdp == unsharded", "gathered_params", "dcp round trip", "bf16 params + AC"):
        assert f"fsdp2-smoke: {check}" in out.stdout and "FAILED" not in out.stdout, out.stdout
