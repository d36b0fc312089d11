"""Data parallelism with PyTorch's own stack: the process group from torchrun, FSDP2 on an HF causal LM.

One process needs nothing: `init_distributed()` returns world size 1 and
`apply_fsdp` then only applies activation checkpointing / compile. Under

    torchrun --nproc-per-node 8 [--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT] script.py

`init_distributed()` creates the default process group from torchrun's
environment (NCCL on CUDA, gloo on CPU) and `apply_fsdp(model, ParallelConfig())`
shards the model with FSDP2 `fully_shard`: one unit per decoder layer, one at
the root (embeddings, final norm, LM head, tied or not). Order of the wrappers:
activation checkpointing -> compile -> FSDP.

The fused ops take the LM-head weight outside `model.forward`, so a sharded
model is called through `run_forward(model, fn, ...)`: it runs `fn(model, ...)`
as the root's forward, so the root's parameters are gathered for it and their
gradients reduce-scattered in backward. On an unsharded model it is `fn(model, ...)`.

Gradients: FSDP2 averages them over the data-parallel ranks, so a loss summed
over a rank's tokens is divided by (global count / world size); see
`fusedrl.train.dp_balance.global_counts` and `loss_divisor`.
"""
from __future__ import annotations

import os
import types
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, List, Optional

import torch
import torch.distributed as dist

from fusedrl.config import ParallelConfig  # noqa: F401  (the [parallel] table; re-exported here)

_CALL = "_fusedrl_sharded_call"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ranks, world size, its device and the backend (None: no process group)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: Optional[str]

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------- process group

def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_distributed(*, backend: Optional[str] = None, timeout_s: float = 600.0) -> DistInfo:
    """Create the default process group from torchrun's environment (idempotent).

    Without WORLD_SIZE in the environment (a plain `python script.py`) no group is
    created and world size is 1. Backend: NCCL when CUDA is available, else gloo.
    On CUDA each process uses GPU LOCAL_RANK.

    Args:
        backend: force "nccl" or "gloo" (default: chosen from the device).
        timeout_s: collective timeout; a rank blocked longer on a dead peer raises.
    Returns:
        A DistInfo.
    """
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be None, 'nccl' or 'gloo', got {backend!r}")
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), local_world, device, dist.get_backend())
    if world == 1 and "MASTER_ADDR" not in os.environ:
        return DistInfo(0, 0, 1, 1, device, None)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, local_rank, world, local_world, device, backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def build_mesh(cfg: ParallelConfig, device_type: str):
    """The data-parallel DeviceMesh: 1-D ("dp_shard",) or, for HSDP, 2-D ("dp_replicate", "dp_shard")."""
    from torch.distributed.device_mesh import init_device_mesh

    world = world_size()
    shard = world // cfg.dp_replicate if cfg.dp_shard == -1 else cfg.dp_shard
    if shard * cfg.dp_replicate != world:
        raise ValueError(f"parallel.dp_replicate * dp_shard must equal the world size {world}, "
                         f"got {cfg.dp_replicate} * {shard}")
    if cfg.dp_replicate == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device_type, (cfg.dp_replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


# ----------------------------------------------------------------------------- FSDP2

def decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The decoder layers of an HF model: modules whose class is in `_no_split_modules` (of the model or of
    any submodule, so a wrapper around an HF backbone, e.g. a ScalarHeadModel, is found too)."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"model: found no decoder layers in {type(model).__name__} (its _no_split_modules "
                         f"{sorted(names)} match no submodule); apply_fsdp needs an HF causal LM")
    return layers


def _activation_checkpointing(model: torch.nn.Module) -> None:
    # HF's own per-layer checkpointing keeps parameter names unchanged (checkpoints stay loadable),
    # unlike wrapping layers in torch's checkpoint_wrapper. Non-reentrant: required under FSDP2.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"activation_checkpointing: {type(model).__name__} has no activation_checkpointing_enable")


def apply_fsdp(model: torch.nn.Module, cfg: ParallelConfig, *, mesh=None) -> torch.nn.Module:
    """Activation checkpointing -> compile -> FSDP2 (`fully_shard` per decoder layer, then the root).

    Frozen models (reference, reward) are sharded the same way; parameters that do
    not require grad get no gradient and no optimizer state. Without a process group
    (world size 1) no FSDP is applied. Build the optimizer after this call.

    Args:
        model: an HF causal LM (or a model whose `_no_split_modules` names its blocks), on its device.
        cfg: a ParallelConfig.
        mesh: a DeviceMesh (default: `build_mesh(cfg, ...)`).
    Returns:
        The same module, modified in place (its class becomes FSDP<cls> when sharded).
    """
    if not isinstance(cfg, ParallelConfig):
        raise TypeError(f"cfg must be a ParallelConfig, got {type(cfg).__name__}")
    layers = decoder_layers(model)
    if cfg.activation_checkpointing:
        _activation_checkpointing(model)
    if cfg.compile:
        for layer in layers:
            layer.compile()
    if not is_distributed():
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, \
        register_fsdp_forward_method

    device = next(model.parameters()).device
    mesh = mesh if mesh is not None else build_mesh(cfg, device.type)
    kwargs = {"mesh": mesh}
    if cfg.mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype],
                                                   reduce_dtype=DTYPES[cfg.reduce_dtype])
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
        layer._fusedrl_reshard_after_forward = cfg.reshard_after_forward  # restored by gathered_params
    # A trained root's weights (embeddings, LM head) are needed again right away in backward: keep
    # them gathered. A frozen model has no backward to reshard them: free them after forward.
    trainable = any(p.requires_grad for p in model.parameters())
    fully_shard(model, reshard_after_forward=not trainable, **kwargs)
    model._fusedrl_reshard_after_forward = not trainable
    setattr(model, _CALL, types.MethodType(lambda self, fn, *a, **k: fn(self, *a, **k), model))
    register_fsdp_forward_method(model, _CALL)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def run_forward(model: torch.nn.Module, fn: Callable, *args, **kwargs):
    """`fn(model, *args, **kwargs)` run as the model's forward (FSDP2: root weights gathered, grads reduced).

    Use it for everything that reads weights outside `model.forward`, e.g.
    `packed_forward(model, ...)` followed by `linear_logprobs(hidden, model.lm_head.weight, ...)`.
    """
    call = getattr(model, _CALL, None)
    return call(fn, *args, **kwargs) if call is not None else fn(model, *args, **kwargs)


@dataclass(frozen=True)
class GatherReport:
    """What `gathered_params` costs on this rank, in bytes."""

    sharded_bytes: int  # this rank's parameter shards (they stay allocated inside the context)
    full_bytes: int  # the gathered parameters: the whole model, in the gathered (compute) dtype
    extra_bytes: int  # what the context adds: full_bytes on a sharded model (new buffers), 0 otherwise
    device_delta_bytes: Optional[int]  # measured torch.cuda.memory_allocated change (None on CPU)


def _fsdp_modules(model: torch.nn.Module):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered_params(model: torch.nn.Module) -> Iterator[GatherReport]:
    """Full (unsharded) parameters for the rollout; resharded on exit. No-op report on an unsharded model.

    Inside, every parameter is a plain tensor of the full shape, so a sampler can read
    the weights in place; forwards do not reshard. All ranks must enter together.
    """
    modules = _fsdp_modules(model)
    if not modules:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        yield GatherReport(size, size, 0, None)
        return
    sharded = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    cuda = torch.cuda.is_available()  # (with CPU offload the shards live on CPU, the gathered copy on the GPU)
    before = torch.cuda.memory_allocated() if cuda else None
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
    try:
        for module in modules:
            module.unshard()  # all-gathers; the module's parameters become the full tensors
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        delta = torch.cuda.memory_allocated() - before if cuda else None
        yield GatherReport(sharded, full, full, delta)
    finally:
        for module in modules:
            module.reshard()
        for module in modules:
            module.set_reshard_after_forward(getattr(module, "_fusedrl_reshard_after_forward", True), recurse=False)
