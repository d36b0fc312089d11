"""What may change when a run is resumed, and making the changes real.

A resumed run continues the exact state of its checkpoint (weights, AdamW moments, schedule
position, data position, RNGs). A field of the config may differ from the one the folder
recorded only when the engine can apply it faithfully:

    RESUMABLE   optim.*, schedule.*, loop.*, checkpoint.*, logging.*, run.device, run.num_threads,
                run.out_dir, data.eval, sft.eval_micro_batches
                -> applied: `apply_optim_config` sets the new lr / weight decay / betas / eps in the
                   restored optimizer and rebuilds the schedule from the new fields at the restored step.

Any other change (the model, the training data and its packing, the seed, the stage's own
tables) would silently train something else than the checkpoint's run, so it is refused,
naming the field, before anything is written. config.toml is then rewritten with the values
in force.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

logger = logging.getLogger("fusedrl")

RESUMABLE_SECTIONS = ("optim", "schedule", "loop", "checkpoint", "logging")
RESUMABLE_FIELDS = ("run.device", "run.num_threads", "run.out_dir", "data.eval", "sft.eval_micro_batches")


def flatten(cfg: Any, prefix: str = "") -> Dict[str, Any]:
    """{"section.field": value} of a config tree; table fields (model.arch) are flattened by key."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key))
        elif isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if v is not None})
        else:
            out[key] = value
    return out


def resumable(key: str) -> bool:
    return key.split(".", 1)[0] in RESUMABLE_SECTIONS or key in RESUMABLE_FIELDS


def config_changes(old: Any, new: Any) -> List[Tuple[str, Any, Any]]:
    """(key, old value, new value) of every field that differs, sorted by key."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(cfg: Any, folder: Path) -> List[Tuple[str, Any, Any]]:
    """Compare `cfg` with folder/config.toml; RunDirError naming the first refused change.

    Returns:
        The accepted changes (all resumable), which the resumed run applies; each is logged.
    """
    from fusedrl.config import load_config
    from fusedrl.train.run_dir import RunDirError

    path = Path(folder) / "config.toml"
    if not path.is_file():
        raise RunDirError(f"--resume: {folder} has no config.toml; it is not a run folder (nothing to resume)")
    stage = _recorded_stage(path)
    if stage != cfg.run.stage:
        raise RunDirError(f"--resume: {folder} holds a {stage!r} run, not {cfg.run.stage!r} (run.stage); "
                          "resume it with its own config, or choose another run.out_dir")
    try:
        old = load_config(path, cls=type(cfg))
    except ValueError as err:
        raise RunDirError(f"--resume: {path} does not load with this config's class: {err}") from None
    changes = config_changes(old, cfg)
    refused = [c for c in changes if not resumable(c[0])]
    if refused:
        key, before, after = refused[0]
        others = f" (and {', '.join(c[0] for c in refused[1:])})" if len(refused) > 1 else ""
        raise RunDirError(f"--resume: {key} was {before!r} in {path}, now {after!r}{others}; it cannot change "
                          "on resume (the checkpoint was trained with it): restore it, or start a new run")
    for key, before, after in changes:
        logger.warning("--resume: %s changes from %r to %r; the resumed run uses %r", key, before, after, after)
    return changes


def _recorded_stage(path: Path) -> str:
    from fusedrl.config_io import read_toml
    try:
        return read_toml(path).get("run", {}).get("stage", "sft")
    except ValueError as err:
        from fusedrl.train.run_dir import RunDirError
        raise RunDirError(f"--resume: {err}") from None


def apply_optim_config(optimizer, scheduler, cfg: Any) -> None:
    """Make a restored optimizer and LambdaLR follow `cfg.optim` / `cfg.schedule` from the restored step.

    load_state_dict brings back the saved lr, weight_decay, betas, eps and base_lrs; this puts the
    configured ones in force (a no-op, bit for bit, when they did not change). The schedule's shape
    (warm-up, decay, total steps) already comes from `cfg`: its lambda is not saved in checkpoints.
    """
    for group in optimizer.param_groups:
        vectors_only = all(p.dim() < 2 for p in group["params"])
        group["weight_decay"] = 0.0 if vectors_only else cfg.optim.weight_decay
        group["betas"] = tuple(cfg.optim.betas)
        group["eps"] = cfg.optim.eps
        group["initial_lr"] = cfg.optim.lr
    scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    lrs = [base * factor for base, factor in zip(scheduler.base_lrs, factors)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
