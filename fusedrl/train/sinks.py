"""Optional metric sinks besides metrics.jsonl: TensorBoard and Weights & Biases (rank 0 only).

    [logging]
    tensorboard = true              # OUT_DIR/tensorboard, a SummaryWriter event file (extra: tensorboard)
    wandb_project = "my-project"    # a W&B run in that project (extra: wandb)
    wandb_entity = "my-team"        # optional
    wandb_mode = "offline"          # online / offline / disabled; "" leaves it to WANDB_MODE

Train metrics are logged under "train/<name>", evaluation metrics under their "eval/<name>" key,
both at the optimizer step. `check_logging` runs when the config is loaded: a sink whose package
is missing stops the run there with one line naming the extra to install.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from pathlib import Path
from typing import Any, Dict, List

from fusedrl.config_io import ConfigError

WANDB_MODES = ("", "online", "offline", "disabled")
_EXTRAS = {"tensorboard": ("logging.tensorboard", "tensorboard"), "wandb": ("logging.wandb_project", "wandb")}


def _require(module: str) -> Any:
    """Import `module` or raise a one-line ConfigError naming the fusedrl extra that installs it."""
    field, extra = _EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError.message(field, f"{field}: needs the {module!r} package, which is not installed; "
                                  f"pip install 'fusedrl[{extra}]'") from None


def check_logging(logging_cfg: Any) -> None:
    """ConfigError naming the field for a bad wandb_mode or a sink whose package is missing."""
    mode = getattr(logging_cfg, "wandb_mode", "")
    if mode not in WANDB_MODES:
        raise ConfigError("logging.wandb_mode", mode, f"one of {WANDB_MODES}")
    if getattr(logging_cfg, "tensorboard", False):
        _require("tensorboard")
    if getattr(logging_cfg, "wandb_project", None):
        _require("wandb")


def _numbers(record: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")}


def _tag(key: str, kind: str) -> str:
    return key if kind == "eval" or "/" in key else f"train/{key}"


class TensorBoardSink:
    """Scalars into OUT_DIR/tensorboard (torch.utils.tensorboard.SummaryWriter); the config as text."""

    def __init__(self, run_dir: Path, cfg: Any):
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        from fusedrl.config_io import to_toml

        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("config", "```toml\n" + to_toml(cfg) + "\n```", 0)

    def log(self, step: int, record: Dict[str, Any], kind: str) -> None:
        for key, value in _numbers(record).items():
            if math.isfinite(value):  # TensorBoard draws NaN as a gap anyway; inf breaks its axis
                self.writer.add_scalar(_tag(key, kind), value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run named after the run folder, with the run id of run.json (a resume continues it)."""

    def __init__(self, run_dir: Path, cfg: Any):
        wandb = _require("wandb")
        from fusedrl.train.run_dir import folder_run_id

        logging_cfg = cfg.logging
        kwargs = dict(project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity or None,
                      dir=str(run_dir), name=Path(run_dir).name,
                      config=dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {})
        run_id = folder_run_id(run_dir)
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        if logging_cfg.wandb_mode:
            kwargs["mode"] = logging_cfg.wandb_mode
        self.run = wandb.init(**kwargs)

    def log(self, step: int, record: Dict[str, Any], kind: str) -> None:
        self.run.log({_tag(k, kind): v for k, v in _numbers(record).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(run_dir: str | Path, cfg: Any) -> List[Any]:
    """The sinks `cfg.logging` asks for (call on rank 0 only); [] when none."""
    logging_cfg = getattr(cfg, "logging", None)
    if logging_cfg is None:
        return []
    check_logging(logging_cfg)
    sinks: List[Any] = []
    if getattr(logging_cfg, "tensorboard", False):
        sinks.append(TensorBoardSink(Path(run_dir), cfg))
    if getattr(logging_cfg, "wandb_project", None):
        sinks.append(WandbSink(Path(run_dir), cfg))
    return sinks
