"""Config table of the distillation stage: [distill] (plus the RL stages' [rollout] for sampling).

Every field is documented by the string under it (the engine's `describe_config`
reads these). `DistillTrainConfig` is `TrainConfig` plus [rollout] and [distill]:

    [run]
    stage = "distill"
    [rollout]                 # how the student samples (prompts_per_rollout, group_size, max_new_tokens, ...)
    prompts_per_rollout = 8
    group_size = 2
    [distill]
    mode = "on_policy"        # or "mixed" (GKD lambda) or "self" (SDPO)
    teacher = "path/or/hub-id"
    kind = "reverse_kl"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fusedrl.config import TrainConfig
from fusedrl.stages.configs_rl import RolloutConfig, check_rollout
from fusedrl.config_io import ConfigError

MODES = ("on_policy", "mixed", "self")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
DIVERGENCE_AGGREGATIONS = ("token_mean", "seq_mean", "seq_mean_fixed_len")


@dataclass
class DistillStageConfig:
    mode: str = "on_policy"
    """"on_policy" (the student samples, GKD lambda = 1), "mixed" (a share 1 - lam of the steps trains on
    the data's teacher-written completions) or "self" (SDPO: the model itself, shown a correct sibling
    completion of the same group, is the teacher)."""
    teacher: Optional[str] = None
    """Teacher model folder or hub id (any causal LM with the student's vocabulary); required unless mode = "self"."""
    kind: str = "reverse_kl"
    """Per-token divergence: "reverse_kl" KL(student || teacher), "forward_kl" KL(teacher || student) or "jsd"."""
    beta: float = 0.5
    """Generalised JSD teacher weight in [0, 1] (kind = "jsd"; 0 = forward KL, 1 = reverse KL)."""
    temperature: float = 1.0
    """Temperature dividing both models' logits inside the divergence."""
    top_k: int = 0
    """0: the exact full-vocabulary divergence; K > 0: the top-K-plus-tail approximation (the SDPO recipe)."""
    aggregation: str = "token_mean"
    """Loss aggregation over completion tokens: token_mean, seq_mean or seq_mean_fixed_len."""
    lam: float = 0.5
    """mode = "mixed": the share of steps trained on the student's own samples (GKD's lambda); the rest
    trains on the data's `completion` fields (teacher-written)."""
    offload_teacher: bool = False
    """Keep the teacher on the CPU between uses (moved to the device for its forwards only)."""
    correct_threshold: float = 1.0
    """mode = "self": a completion is correct when its rollout.verifier reward is >= this."""
    demo_template: str = "{prompt}\nA correct answer: {demo}\nAnswer again."
    """mode = "self": the teacher's prompt, with {prompt} (the record's prompt) and {demo} (a correct sibling)."""
    resample_rounds: int = 2
    """mode = "self": extra rollouts of fresh prompts to refill groups with no correct completion (0: none)."""


@dataclass
class DistillTrainConfig(TrainConfig):
    """TrainConfig plus the [rollout] and [distill] tables."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    distill: DistillStageConfig = field(default_factory=DistillStageConfig)


def _number(key: str, value, low: float, high: Optional[float] = None, *, open_low: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad:
        bad = value <= low if open_low else value < low
        bad = bad or (high is not None and value > high)
    if bad:
        span = f"({low}, " if open_low else f"[{low}, "
        raise ConfigError.message(key, f"{key}: expected a number in {span}{'inf)' if high is None else str(high) + ']'}, "
                         f"got {value!r}")


def check_distill(cfg: DistillStageConfig, rollout: RolloutConfig) -> None:
    """Validate [distill] (and the [rollout] fields it uses); raise ValueError naming the key."""
    if cfg.mode not in MODES:
        raise ConfigError.message("distill.mode", f"distill.mode: expected one of {MODES}, got {cfg.mode!r}")
    if cfg.kind not in DIVERGENCES:
        raise ConfigError.message("distill.kind", f"distill.kind: expected one of {DIVERGENCES}, got {cfg.kind!r}")
    if cfg.aggregation not in DIVERGENCE_AGGREGATIONS:
        raise ConfigError.message("distill.aggregation", f"distill.aggregation: expected one of {DIVERGENCE_AGGREGATIONS}, got {cfg.aggregation!r}")
    _number("distill.beta", cfg.beta, 0.0, 1.0)
    _number("distill.temperature", cfg.temperature, 0.0, open_low=True)
    _number("distill.lam", cfg.lam, 0.0, 1.0)
    if isinstance(cfg.top_k, bool) or not isinstance(cfg.top_k, int) or cfg.top_k < 0:
        raise ConfigError.message("distill.top_k", f"distill.top_k: expected an int >= 0 (0 = exact), got {cfg.top_k!r}")
    if isinstance(cfg.resample_rounds, bool) or not isinstance(cfg.resample_rounds, int) or cfg.resample_rounds < 0:
        raise ConfigError.message("distill.resample_rounds", f"distill.resample_rounds: expected an int >= 0, got {cfg.resample_rounds!r}")
    if cfg.mode == "self":
        if rollout.verifier is None:
            raise ConfigError.message("rollout.verifier", "rollout.verifier: distill.mode = 'self' needs a verifier to "
                                      "find correct siblings")
        if rollout.group_size < 2:
            raise ConfigError.message("rollout.group_size", "rollout.group_size: distill.mode = 'self' needs "
                                      f"siblings (group_size >= 2), got {rollout.group_size}")
        if "{demo}" not in cfg.demo_template or "{prompt}" not in cfg.demo_template:
            raise ConfigError.message("distill.demo_template", f"distill.demo_template: must contain {{prompt}} and {{demo}}, got {cfg.demo_template!r}")
    elif not cfg.teacher:
        raise ConfigError.message("distill.teacher", f"distill.teacher: mode {cfg.mode!r} needs a teacher model (a folder or hub id)")
    check_rollout(rollout, require_reward=False)
