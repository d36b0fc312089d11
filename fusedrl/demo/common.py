"""What the demo's extra step modules (demo_alignment, demo_rl) share: building a stage's config.

A step's config starts from the demo's own tables (every section the step's config class
shares with the demo config, deep-copied), gets the stage's run folder, a length scaled
from the demo's ``loop.max_steps``, the module's per-stage overrides, then the user's
``[demo] stage_overrides`` for that stage (which win).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Dict, Optional, Type, TypeVar

from fusedrl.config import apply_override

C = TypeVar("C")


def demo_stage_config(ctx, stage: str, config_cls: Type[C], stage_defaults: Dict[str, Dict[str, Any]],
                      prepare: Optional[Callable[[C, Any], None]] = None) -> C:
    """A ``config_cls`` for ``stage``: the demo's tables, the module's defaults, [demo] stage_overrides.

    Args:
        ctx: the `DemoContext` (uses .cfg, .out_dir).
        stage: the stage name, a key of ``stage_defaults``.
        config_cls: the root config dataclass of the step module (e.g. ``RLTrainConfig``).
        stage_defaults: ``{stage: {"share": float, "min_steps": int, "overrides": {dotted key: value}}}``;
            the stage runs ``max(min_steps, int(demo loop.max_steps * share))`` steps.
        prepare: ``prepare(cfg, ctx)``, the module's own settings, applied before any override.
    Returns:
        the config; the module validates what it needs (overrides are applied as from a file).
    """
    cfg = config_cls()
    for f in dataclasses.fields(config_cls):
        if hasattr(ctx.cfg, f.name):
            setattr(cfg, f.name, copy.deepcopy(getattr(ctx.cfg, f.name)))
    defaults = stage_defaults[stage]
    cfg.run.stage, cfg.run.out_dir = stage, str(ctx.out_dir / stage)
    cfg.loop.max_steps = max(defaults["min_steps"], int(ctx.cfg.loop.max_steps * defaults["share"]))
    cfg.loop.eval_every = 0
    cfg.logging.console_every = max(1, cfg.loop.max_steps // 4)
    if prepare is not None:
        prepare(cfg, ctx)
    overrides = {**defaults["overrides"], **ctx.cfg.demo.stage_overrides.get(stage, {})}
    for key, value in overrides.items():
        apply_override(cfg, key, value, from_cli=False)
    return cfg
