"""From a TrainConfig to a finished run: seed, tokenizer, model, stage, loop, plots, report.

    from fusedrl.config import load_config
    from fusedrl.train.run import run_training
    result = run_training(load_config("examples/sft_tiny.toml", [("loop.max_steps", "50")]))

This is what `fusedrl train CONFIG.toml` calls. final/ gets a Hugging Face model card (README.md).
"""
from __future__ import annotations

import errno
import logging
import math
import os
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from fusedrl.config import ConfigError, TrainConfig, load_config
from fusedrl.data.tokenizer import build_tokenizer
from fusedrl.models.causal_lm import build_policy
from fusedrl.train.loop import NonFiniteError, TrainResult, train
from fusedrl.train.metrics import is_rank0, read_metrics, write_plots, write_report
from fusedrl.train.model_card import write_model_card
from fusedrl.train.run_dir import RunDirError, open_run_dir
from fusedrl.train.sinks import check_logging

logger = logging.getLogger("fusedrl")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError.message("run.device", f"run.device: {name!r} is not a device; expected auto, cpu, cuda or "
                                  "cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError.message("run.device", f"run.device: {name!r} is not supported; expected auto, cpu, cuda or "
                                  "cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError.message("run.device", f"run.device: {name!r} asked for, but CUDA is not available")
    return device


def load_run_config(path: str, overrides=()) -> TrainConfig:
    """Load a run file with the root config class of its stage (`STAGE_CONFIGS`, default TrainConfig).

    The stage is `--run.stage` if overridden, else the file's [run] stage, else "sft".
    """
    from fusedrl.config_io import read_toml
    from fusedrl.stages import STAGE_CONFIGS, STAGES, check_stage_config

    stage = read_toml(path).get("run", {}).get("stage", "sft")
    for key, value in overrides:
        if key == "run.stage":
            stage = value
    if stage not in STAGES:
        raise ConfigError("run.stage", stage, sorted(STAGES), f"run.stage: expected one of {sorted(STAGES)}, got {stage!r}")
    cfg = load_config(path, overrides, cls=STAGE_CONFIGS.get(stage, TrainConfig))
    check_stage_config(cfg, stage)  # all validation at load: a bad value never reaches the model build
    check_logging(cfg.logging)  # a TensorBoard / W&B sink whose package is missing stops here
    return cfg


def check_finite_outcome(model: torch.nn.Module, result: TrainResult) -> None:
    """NonFiniteError when the trained weights or the last evaluation are not finite (nothing is published)."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"the final weights are not finite ({len(bad)} tensors, first {bad[0]}); "
                             "final/ was not written. Lower optim.lr or check the data")
    for key, value in result.eval_metrics.items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            name = key if key.startswith("eval/") else f"eval/{key}"
            raise NonFiniteError(f"the final evaluation's {name} is {value}; final/ was not written. "
                                 "Lower optim.lr or check data.eval")


_FULL = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM)


def run_training(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, model=None, tokenizer=None,
                 on_step_end: Optional[Callable] = None, extra_eval: Optional[Callable] = None) -> TrainResult:
    """Run the stage `cfg.run.stage` of `cfg` and write the run folder.

    Everything that can be checked before training is checked first (the device, the data files,
    the run folder: see `fusedrl.train.run_dir`); a refused run writes nothing.

    Args:
        cfg: the resolved config.
        resume: continue from the newest valid checkpoint in cfg.run.out_dir.
        overwrite: the folder holds an earlier run: move it aside (OUT_DIR.old-TIME) and start over.
        model, tokenizer: use these instead of building them from cfg.model (the demo chains stages so).
        on_step_end, extra_eval: passed to the loop (see `fusedrl.train.loop.train`).
    Returns:
        The loop's TrainResult.
    Raises:
        ValueError (RunDirError, a data or config error) naming the input; NonFiniteError when the
        final weights or evaluation are not finite.
    """
    from fusedrl.data.validate import check_data_paths, rl_prompt_limit, using_bad_record_policy
    from fusedrl.data.sources import using_data_options
    from fusedrl.stages import STAGES

    if cfg.run.stage not in STAGES:
        raise ConfigError("run.stage", cfg.run.stage, sorted(STAGES),
                          f"run.stage: expected one of {sorted(STAGES)}, got {cfg.run.stage!r}")
    device = resolve_device(cfg.run.device)
    check_data_paths(cfg)
    rl_prompt_limit(cfg)
    device = start_distributed(cfg, device)
    with _fail_together(cfg), open_run_dir(cfg, resume=resume, overwrite=overwrite, write=is_rank0()) as folder:
        try:  # (open_run_dir wrote config.toml: the values in force, resume changes applied)
            with using_bad_record_policy(cfg.data.on_bad_record), using_data_options(cfg.data):
                return _run(cfg, folder.path, device, resume, model, tokenizer, on_step_end, extra_eval)
        except OSError as err:
            message = _disk_error(err, folder.path)
            if message is None:
                raise
            raise RunDirError(message) from err


def start_distributed(cfg: TrainConfig, device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE set): the process group (NCCL on CUDA, gloo on CPU) and this rank's device.

    Also at world size 1 (`torchrun --nproc-per-node 1`: FSDP2 on one GPU). A plain process (no
    WORLD_SIZE) creates nothing and keeps `device`.
    """
    if "WORLD_SIZE" not in os.environ:
        return device
    from fusedrl.train.parallel import init_distributed

    backend = "nccl" if device.type == "cuda" else "gloo"
    info = init_distributed(backend=backend, timeout_s=cfg.parallel.timeout_s)
    if info.is_rank0:
        logger.info("torch.distributed: %d ranks (%s), this rank on %s", info.world_size, info.backend, info.device)
    return info.device if device.type == "cuda" else device


def _fail_together(cfg: TrainConfig):
    """Any rank's failure stops every rank with that rank's message (a no-op in one process)."""
    from fusedrl.train.fail_fast import fail_together

    return fail_together(timeout_s=cfg.parallel.timeout_s, poll_s=min(0.5, cfg.parallel.timeout_s))


def shard_models(cfg: TrainConfig, model: torch.nn.Module, stage) -> None:
    """FSDP2 on every model of the stage, before the optimizers are built (one process: nothing).

    The policy, the other trained modules (PPO's critic: `stage.trainables`) and the RL frozen
    models (reference, reward model, a distillation teacher: `fusedrl.train.dist_step.frozen_models`)
    are each sharded as an FSDP2 root of their own. The loop runs the critic's loss as the critic's
    own forward/backward (`stage.module_losses()`), and the rollout gathers them all with the policy.
    """
    from fusedrl.train.parallel import apply_fsdp, is_distributed

    if is_distributed():
        from torch.distributed.fsdp import fully_shard

        from torch.distributed.tensor import DTensor

        from fusedrl.train.dist_step import frozen_models, other_trained, teachers

        for teacher in teachers(stage):
            teacher.prepare_sharding()  # its body on the device (FSDP2 shards it; no offload of its own)
        roles = [("policy", model)] + [("trained", m) for m in other_trained(stage, model)] + \
            [("frozen", m) for m in frozen_models(stage)]
        for role, module in roles:
            apply_fsdp(module, cfg.parallel)
            # Make the model the FSDP root now: a rollout may call its backbone (packed log-probs) before
            # any root forward, which would otherwise make each decoder layer a root of its own.
            fully_shard.state(module)._lazy_init()
            params = list(module.parameters())
            if is_rank0():
                logger.info("FSDP2: %s %s sharded, %d of %d parameters are DTensors", role, type(module).__name__,
                            sum(isinstance(p, DTensor) for p in params), len(params))


def _finite_everywhere(model: torch.nn.Module, result: TrainResult) -> None:
    """check_finite_outcome on a sharded model: each rank checks its shards, the verdict is all-reduced."""
    import torch.distributed as dist

    bad = [name for name, p in model.named_parameters()
           if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())]
    count = torch.tensor([len(bad)], dtype=torch.int64, device=next(model.parameters()).device)
    dist.all_reduce(count)
    if int(count.item()):
        raise NonFiniteError(f"the final weights are not finite ({int(count.item())} tensor shards); "
                             "final/ was not written. Lower optim.lr or check the data")
    check_finite_outcome(torch.nn.Linear(1, 1), result)  # the evaluation part


def _disk_error(err: OSError, run_dir: Path) -> Optional[str]:
    """One line for a full disk / read-only file system anywhere, or a permission error in the run folder."""
    inside = err.filename is None or Path(run_dir).resolve() in Path(err.filename).resolve().parents
    if err.errno in _FULL or (err.errno in _DENIED and inside):
        prefix = "run.out_dir: " if inside else ""
        return f"{prefix}cannot write {err.filename or run_dir}: {os.strerror(err.errno)}"
    return None


def _log_overlong(before: dict, after: dict, cfg: TrainConfig) -> None:
    """Log how many examples the stage's data loading truncated or dropped (data.max_len, data.overlong)."""
    delta = {k: after[k] - before[k] for k in after}
    if any(delta.values()):
        logger.warning("data: %d examples truncated to data.max_len = %d, %d dropped as longer (data.overlong = %r), "
                       "%d dropped with no trained token left", delta["truncated"], cfg.data.max_len,
                       delta["dropped_overlong"], cfg.data.overlong, delta["dropped_untrained"])


def _run(cfg: TrainConfig, run_dir: Path, device: torch.device, resume: bool, model, tokenizer,
         on_step_end, extra_eval) -> TrainResult:
    from fusedrl.stages import STAGE_MODELS, STAGES

    seed_everything(cfg.run.seed)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    from fusedrl.kernels.invariant import set_invariant
    set_invariant(bool(getattr(getattr(cfg, "numerics", None), "invariant", False)))  # [numerics]
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.model)
    if model is None:
        build = STAGE_MODELS.get(cfg.run.stage)
        if build and getattr(cfg.model, "lora", None):
            raise ConfigError.message("model.lora", f"model.lora: LoRA applies to the policy; the {cfg.run.stage} "
                                      "stage trains another model")
        model = build(cfg, tokenizer, device) if build else build_policy(cfg.model, tokenizer, device)
    from fusedrl.data.records import overlong_counts
    from fusedrl.data.validate import rl_prompt_limit, using_prompt_limit
    counts_before = overlong_counts()
    with using_prompt_limit(tokenizer, rl_prompt_limit(cfg), "data.max_len - rollout.max_new_tokens"):
        stage = STAGES[cfg.run.stage](cfg, model, tokenizer)
    _log_overlong(counts_before, overlong_counts(), cfg)
    shard_models(cfg, model, stage)
    result = train(model, stage, cfg, run_dir=run_dir, resume=resume, on_step_end=on_step_end,
                   extra_eval=extra_eval)
    from fusedrl.train.parallel import is_distributed, is_sharded

    if is_distributed() and is_sharded(model):
        if not result.interrupted:
            _finite_everywhere(model, result)
            if cfg.checkpoint.save_final:
                from fusedrl.train.dist_checkpoint import save_final_hf
                save_final_hf(model, run_dir / "final", tokenizer=tokenizer)  # collective; rank 0 writes
        if is_rank0() and not result.interrupted:
            if cfg.logging.plots:
                write_plots(read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots")
            write_report(run_dir, title=f"fusedrl run: {cfg.run.stage} ({run_dir.name})")
        return result
    if is_rank0() and not result.interrupted:
        check_finite_outcome(model, result)
        if cfg.checkpoint.save_final:
            from fusedrl.models.causal_lm import save_model
            save_model(model, run_dir / "final", tokenizer=tokenizer, merge_adapters=True)  # LoRA: merged
            write_model_card(run_dir / "final", cfg, result)
        if cfg.logging.plots:
            write_plots(read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots", title=f"{cfg.run.stage}: {run_dir.name}")
        write_report(run_dir, title=f"fusedrl run: {cfg.run.stage} ({run_dir.name})")
    return result
