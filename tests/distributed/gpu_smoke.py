"""1-GPU FSDP2 smoke run (bench/gpu_check.sh runs it; CUDA only):

    torchrun --standalone --nproc-per-node 1 -m tests.distributed.gpu_smoke

A world-size-1 process group (NCCL), so FSDP2 really shards (one shard) and the
CUDA paths run: the Triton log-prob / policy-loss / varlen-attention kernels on
a sharded model, an SFT and a GRPO step matching the unsharded model, bf16 mixed
precision + activation checkpointing, CPU offload, gathered parameters for the
rollout, a DCP checkpoint round trip. Prints one "fsdp2-smoke:" line per check
and exits non-zero on the first failure. `--cpu` runs the same checks with gloo
on CPU (except CPU offload) to check the script itself on a machine without a GPU.
"""
import sys
import tempfile
import time
from pathlib import Path

import torch

from fusedrl.train.dist_checkpoint import load_dist_checkpoint, save_dist_checkpoint
from fusedrl.train.parallel import ParallelConfig, apply_fsdp, gathered_params, init_distributed
from tests.distributed import _dist_helpers as h


def _run(cfg, device, steps=("sft", "grpo")):
    model, ref = h.tiny_model().to(device), h.frozen_reference().to(device)
    if cfg is not None:
        model, ref = apply_fsdp(model, cfg), apply_fsdp(ref, cfg)
    optimizer = h.optimizer_for(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    records = [h.train_step(model, optimizer, s, algo=algo, rank=0, world=1, ref=ref, device=device)
               for s, algo in enumerate(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model, optimizer, records, time.perf_counter() - start


def _peak(device) -> str:
    return f"peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB" if device.type == "cuda" else "cpu"


def _check(name, ok, detail):
    print(f"fsdp2-smoke: {name:<28} {'ok' if ok else 'FAILED'}  {detail}", flush=True)
    if not ok:
        sys.exit(1)


def main() -> None:
    cpu = "--cpu" in sys.argv
    if not torch.cuda.is_available() and not cpu:
        print("fsdp2-smoke: no CUDA device, skipped")
        return
    info = init_distributed(backend="gloo" if cpu else None)
    if cpu:
        info = type(info)(**{**info.__dict__, "device": torch.device("cpu")})
    device = info.device
    _, _, plain, _ = _run(None, device)
    model, optimizer, sharded, seconds = _run(ParallelConfig(), device)
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(plain, sharded))
    _check("fp32 fsdp == unsharded", diff < 1e-5, f"max |loss diff| {diff:.2e}, {seconds:.2f}s, "
           + _peak(device))
    with gathered_params(model) as report:
        full = isinstance(model.lm_head.weight, torch.Tensor) and model.lm_head.weight.shape[0] == h.VOCAB
    _check("gathered_params", full, f"extra {report.extra_bytes} B, measured {report.device_delta_bytes} B")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_dist_checkpoint(Path(tmp), 2, model=model, optimizer=optimizer)
        other, other_opt, _, _ = _run(ParallelConfig(), device, steps=("sft",))
        load_dist_checkpoint(path, model=other, optimizer=other_opt)
        same = all(torch.equal(a.full_tensor(), b.full_tensor())
                   for a, b in zip(model.parameters(), other.parameters()))
        _check("dcp round trip", same, str(path.name))
    _, _, mixed, seconds = _run(ParallelConfig(mixed_precision=True, activation_checkpointing=True), device)
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(plain, mixed))
    _check("bf16 params + AC", diff < 5e-2, f"max |loss diff| {diff:.2e} (bf16), {seconds:.2f}s")
    if not cpu:
        _, _, offload, seconds = _run(ParallelConfig(cpu_offload=True), device)
        diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(plain, offload))
        _check("cpu offload", diff < 1e-5, f"max |loss diff| {diff:.2e}, {seconds:.2f}s, " + _peak(device))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
