"""From a TrainConfig to a finished run: seed, tokenizer, model, stage, loop, plots, report.

    from fusedrl.config import load_config
    from fusedrl.train.run import run_training
    result = run_training(load_config("examples/sft_tiny.toml", [("loop.max_steps", "50")]))

This is what `fusedrl train CONFIG.toml` calls.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from fusedrl.config import ConfigError, TrainConfig, load_config, save_config, to_toml
from fusedrl.data.tokenizer import build_tokenizer
from fusedrl.models.causal_lm import build_policy
from fusedrl.train.loop import TrainResult, train
from fusedrl.train.metrics import is_rank0, read_metrics, write_plots, write_report

logger = logging.getLogger("fusedrl")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
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
    return cfg


def _write_config(cfg: TrainConfig, run_dir: Path, resume: bool) -> None:
    path = run_dir / "config.toml"
    if resume and path.exists():
        previous = load_config(path, cls=type(cfg))
        if to_toml(previous) != to_toml(cfg):
            logger.warning("--resume: the config differs from the one in %s; the new one is used and saved", path)
    save_config(cfg, path)


def run_training(cfg: TrainConfig, *, resume: bool = False, model=None, tokenizer=None,
                 on_step_end: Optional[Callable] = None, extra_eval: Optional[Callable] = None) -> TrainResult:
    """Run the stage `cfg.run.stage` of `cfg` and write the run folder.

    Args:
        cfg: the resolved config.
        resume: continue from the newest valid checkpoint in cfg.run.out_dir.
        model, tokenizer: use these instead of building them from cfg.model (the demo chains stages so).
        on_step_end, extra_eval: passed to the loop (see `fusedrl.train.loop.train`).
    Returns:
        The loop's TrainResult.
    """
    from fusedrl.stages import STAGE_MODELS, STAGES

    if cfg.run.stage not in STAGES:
        raise ConfigError("run.stage", cfg.run.stage, sorted(STAGES),
                          f"run.stage: expected one of {sorted(STAGES)}, got {cfg.run.stage!r}")
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank0():
        _write_config(cfg, run_dir, resume)
    seed_everything(cfg.run.seed)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    device = resolve_device(cfg.run.device)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.model)
    if model is None:
        build = STAGE_MODELS.get(cfg.run.stage)
        model = build(cfg, tokenizer, device) if build else build_policy(cfg.model, tokenizer, device)
    stage = STAGES[cfg.run.stage](cfg, model, tokenizer)
    result = train(model, stage, cfg, run_dir=run_dir, resume=resume, on_step_end=on_step_end,
                   extra_eval=extra_eval)
    if is_rank0() and not result.interrupted:
        if cfg.checkpoint.save_final:
            from fusedrl.models.causal_lm import save_model
            save_model(model, run_dir / "final", tokenizer=tokenizer)
        if cfg.logging.plots:
            write_plots(read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots")
        write_report(run_dir, title=f"fusedrl run: {cfg.run.stage} ({run_dir.name})")
    return result
