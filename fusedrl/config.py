"""Run configuration: one small dataclass per component, read from TOML, overridden from the CLI.

A run file is TOML with one table per component:

    [run]        stage to run, output folder, seed, device
    [model]      what to train (hub id / local path, or an architecture built from scratch)
    [data]       where the examples come from and how they are packed
    [optim]      AdamW and gradient clipping
    [schedule]   warm-up then constant / linear / cosine decay
    [loop]       steps, evaluation, non-finite handling
    [checkpoint] how often to save, how many to keep
    [logging]    console, progress bar, plots, TensorBoard / W&B sinks
    [sft]        options of the SFT stage (later stages add their own table)
    [numerics]   invariant mode (bitwise layout- and sampler/trainer-invariant log-probs)

Every field is documented by the string literal right under it; `describe_config`
turns those into the reference in docs/engine.md. Command-line overrides are
`--section.field=value` (`--model.arch.hidden_size=64` reaches into a table
field); values are type-checked against the field's annotation. Unknown
sections or keys and ill-typed values raise `ValueError` naming the key.

Adding a stage: write `XConfig` here (fields documented the same way), add one
field `x: XConfig` to `TrainConfig`, and register the stage in
`fusedrl.stages.STAGES`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fusedrl.config_io import (  # noqa: F401  (public API of this module)
    ConfigError, apply_override, apply_table, coerce, describe_tables, field_docs, parse_overrides, read_toml,
    to_toml,
)


@dataclass
class RunConfig:
    stage: str = "sft"
    """Stage to run: a name in `fusedrl.stages.STAGES` (sft, reward_model, rejection, dpo, grpo, dr_grpo, dapo, gspo, cispo, sapo, rloo, reinforce, ppo)."""
    out_dir: str = "runs/default"
    """Run folder: resolved config, metrics.jsonl, checkpoints/, final/, plots/, report.md."""
    seed: int = 0
    """Seed of python, numpy and torch RNGs (and of data shuffling)."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N"."""
    num_threads: int = 0
    """torch intra-op CPU threads (0: torch's default). Tiny CPU models run best with 1:
    their matrices gain nothing from more threads, which spin when the cores are shared."""


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None
    """Hugging Face hub id or local folder of a causal LM; None builds `arch` from scratch."""
    arch: Dict[str, Any] = field(default_factory=dict)
    """Config of a model built from scratch (transformers config kwargs with `model_type`),
    e.g. {model_type = "qwen2", hidden_size = 64, ...}. Used only when name_or_path is None."""
    tokenizer: str = "auto"
    """"auto" (the tokenizer saved with name_or_path), "char" (the built-in character
    tokenizer with a chat template), or a path / hub id."""
    dtype: str = "auto"
    """Parameter dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16"."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Let transformers run the Python code of the model / tokenizer folder (its auto_map). Off: such a
    model is refused with an error (never a prompt on stdin). Reward and reference models never run it."""
    lora: Dict[str, Any] = field(default_factory=dict)
    """LoRA adapters on the policy through PEFT (the `lora` extra), e.g. {r = 16, alpha = 32, dropout = 0.0,
    target_modules = ["q_proj", "v_proj"]}; empty: full fine-tuning. Only the adapters train, the reference
    is the same model with its adapters disabled, and final/ holds the merged weights (docs/lora.md)."""


@dataclass
class DataConfig:
    train: str = ""
    """Training examples: a .jsonl or .parquet file, or a Hugging Face dataset (a save_to_disk folder, a local
    dataset folder or script, or "hf:org/name"; optional ":SPLIT" suffix); format detected from the first record."""
    eval: Optional[str] = None
    """Held-out examples in the same format (any source data.train accepts), used by the stage's evaluation;
    None skips it."""
    max_len: int = 1024
    """Longest example in tokens; longer ones follow `overlong`."""
    overlong: str = "truncate"
    """What to do with examples longer than max_len: "truncate" or "drop" (both logged)."""
    train_on: str = "all_assistant"
    """Chat examples: train on "all_assistant" turns or only the "last_assistant" one."""
    token_budget: int = 4096
    """Tokens per packed micro-batch (the packer fills micro-batches up to this)."""
    micro_batches_per_step: int = 1
    """Micro-batches accumulated into one optimizer step (gradient accumulation)."""
    shuffle: bool = True
    """Shuffle the examples every epoch (seeded by run.seed)."""
    on_bad_record: str = "error"
    """A record with unusable content (empty prompt/completion/chosen/rejected, chosen == rejected,
    a label not in {true, false, 0, 1}, a non-finite margin, an unknown chat role, over 1M characters):
    "error" stops at load naming its file:line; "drop" drops it (the count is logged)."""
    columns: Dict[str, str] = field(default_factory=dict)
    """Record field -> the source's column holding it, e.g. {prompt = "question", answer = "solution"};
    applied before any record check (docs/data.md). Unmapped columns keep their names."""
    split: str = "train"
    """Split of a Hugging Face dataset source in data.train (a ":SPLIT" suffix on the source wins)."""
    eval_split: str = "test"
    """Split of a Hugging Face dataset source in data.eval (a ":SPLIT" suffix on the source wins)."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate of AdamW (reached after the warm-up)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of AdamW."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip gradients to this global L2 norm; 0 disables clipping (the norm is still logged)."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to optim.lr."""
    decay: str = "cosine"
    """After warm-up: "constant", "linear" or "cosine" decay to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of optim.lr."""


@dataclass
class LoopConfig:
    max_steps: int = 1000
    """Optimizer steps to run."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    eval_at_start: bool = False
    """Also evaluate before the first step (a baseline for the report)."""
    max_nonfinite_in_a_row: int = 5
    """Stop with an error after this many consecutive steps with a non-finite loss or gradient."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a resumable checkpoint every this many steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep: int = 2
    """Complete checkpoints to keep (older ones are deleted after a new one is written)."""
    save_final: bool = True
    """Write the trained model (and tokenizer) to OUT_DIR/final in the save_pretrained layout."""


@dataclass
class LoggingConfig:
    progress: bool = True
    """Show a progress bar (rich) on the console."""
    console_every: int = 1
    """Print the step line every this many steps (metrics.jsonl gets every step)."""
    plots: bool = True
    """Write PNG plots (matplotlib) of the logged metrics to OUT_DIR/plots at the end: one per metric
    and overview.png (every metric, shown in report.md); noisy series are drawn smoothed."""
    tensorboard: bool = False
    """Also log the metrics to TensorBoard, in OUT_DIR/tensorboard (needs the `tensorboard` extra)."""
    wandb_project: Optional[str] = None
    """Also log the metrics to this Weights & Biases project (needs the `wandb` extra); None: no W&B."""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team) of the run; None: the account's default."""
    wandb_mode: str = ""
    """W&B mode: "online", "offline" (sync later with `wandb sync`), "disabled"; "": WANDB_MODE or online."""


@dataclass
class SFTConfig:
    normalize_by: str = "tokens"
    """Loss normaliser: "tokens" (mean over all trained tokens of the step) or "sequences"
    (per-sequence sums averaged over the step's sequences)."""
    eval_micro_batches: int = 8
    """Micro-batches of data.eval used for the evaluation loss (0: the whole file)."""


PARALLEL_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class ParallelConfig:
    """The `[parallel]` table: how a model is sharded and what is traded for memory."""

    dp_shard: int = -1
    """Ranks one model copy is sharded over; -1 = all ranks (plain FSDP). With dp_replicate > 1 (HSDP)
    typically the GPUs of one node."""
    dp_replicate: int = 1
    """HSDP: number of model replicas (typically nodes); dp_replicate * dp_shard must equal the world size."""
    mixed_precision: bool = False
    """Gather and compute in `param_dtype` (bf16), reduce gradients in `reduce_dtype` (fp32); the sharded
    master weights and the optimizer state stay in the model's dtype (fp32)."""
    param_dtype: str = "bfloat16"
    """With mixed_precision: the dtype weights are gathered and computed in (bfloat16, float16, float32)."""
    reduce_dtype: str = "float32"
    """With mixed_precision: the dtype gradients are reduced in (bfloat16, float16, float32)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (non-reentrant), keeping only layer inputs."""
    compile: bool = False
    """torch.compile each decoder layer (in place: parameter names are unchanged)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and the optimizer state on CPU (the step runs on CPU)."""
    reshard_after_forward: bool = True
    """Free gathered layer weights after forward (ZeRO-3); False keeps them to backward (ZeRO-2-like)."""
    timeout_s: float = 600.0
    """Collective timeout: a rank waiting longer for its peers raises instead of hanging."""

    def __post_init__(self):
        for name in ("dp_shard", "dp_replicate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                raise ValueError(f"parallel.{name} must be an integer >= 1 (or -1 for dp_shard), got {value!r}")
        if self.dp_replicate == -1:
            raise ValueError("parallel.dp_replicate must be >= 1, got -1")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in PARALLEL_DTYPES:
                raise ValueError(f"parallel.{name} must be one of {sorted(PARALLEL_DTYPES)}, got {getattr(self, name)!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"parallel.timeout_s must be a number > 0, got {self.timeout_s!r}")


@dataclass
class NumericsConfig:
    invariant: bool = False
    """Invariant mode: every reduction a token's numbers go through (matmuls, RMSNorm, attention, the
    LM-head log-softmax) runs in fixed tiles, so a token's log-prob, entropy and hidden-state gradient
    are bitwise the same in any pack layout or micro-batch split, and the native rollout engine's
    log-probs equal the trainer's (ratio_ne_1_frac = 0). Slower; see docs/numerics.md."""


@dataclass
class TrainConfig:
    """A whole run: one field per component table."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# Allowed values of string fields, and lower bounds of numeric ones, by "section.field".
CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.overlong": ("truncate", "drop"),
    "data.on_bad_record": ("error", "drop"),
    "data.train_on": ("all_assistant", "last_assistant"),
    "schedule.decay": ("constant", "linear", "cosine"),
    "sft.normalize_by": ("tokens", "sequences"),
}
MINIMUM = {
    "run.num_threads": 0, "data.max_len": 2, "data.token_budget": 2, "data.micro_batches_per_step": 1,
    "optim.lr": 0.0, "optim.weight_decay": 0.0, "optim.eps": 0.0, "optim.max_grad_norm": 0.0,
    "schedule.warmup_steps": 0, "schedule.min_lr_ratio": 0.0,
    "loop.max_steps": 1, "loop.eval_every": 0, "loop.max_nonfinite_in_a_row": 1,
    "checkpoint.every": 0, "checkpoint.keep": 1, "logging.console_every": 1,
    "sft.eval_micro_batches": 0,
    "pg.resample_rounds": 0,
}
POSITIVE = {"optim.lr", "optim.eps"}  # strictly > 0 (a zero learning rate trains nothing, silently)


# ----------------------------------------------------------------------------- loading

def validate(cfg: Any, prefix: str = "") -> None:
    """Check choice fields and lower bounds (CHOICES, MINIMUM); raise ValueError naming the key."""
    for f in dataclasses.fields(cfg):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, key)
        elif key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}", value, f"one of {CHOICES[key]}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}", value, "a finite number")
        elif key in MINIMUM and value is not None and value < MINIMUM[key]:
            raise ConfigError(f"{key}", value, f"a value >= {MINIMUM[key]}")
        elif key in POSITIVE and value is not None and not value > 0:
            raise ConfigError(f"{key}", value, "a number > 0")
    if not prefix and hasattr(cfg, "optim") and len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas", cfg.optim.betas, "2 values")
    if not prefix and isinstance(getattr(getattr(cfg, "data", None), "columns", None), dict):
        check_data_columns(cfg.data.columns)
    if not prefix and isinstance(getattr(getattr(cfg, "model", None), "lora", None), dict):
        check_lora_table(cfg.model.lora)
    if not prefix and isinstance(getattr(cfg, "parallel", None), ParallelConfig):
        check_parallel(cfg.parallel)


def check_parallel(cfg: ParallelConfig) -> None:
    """The [parallel] table's checks at load time (ConfigError naming parallel.FIELD)."""
    try:
        cfg.__post_init__()
    except ValueError as err:
        text = str(err)
        key = text.split(" ", 1)[0] if text.startswith("parallel.") else "parallel"
        raise ConfigError.message(key, text) from None


def load_config(
    path: Optional[str | Path] = None,
    overrides: Sequence[Tuple[str, str]] = (),
    *,
    cls: type = TrainConfig,
    base: Any = None,
) -> Any:
    """Build a config: defaults (or `base`), then the TOML file, then the overrides; validated.

    Args:
        path: a TOML file, or None for defaults only.
        overrides: ("section.field", "text value") pairs, applied in order.
        cls: the root dataclass (TrainConfig, or a subclass adding tables, as the demo's).
        base: start from a copy of this config instead of cls() defaults.
    Returns:
        An instance of `cls`.
    """
    cfg = copy.deepcopy(base) if base is not None else cls()
    if path is not None:
        apply_table(cfg, read_toml(path), "")
    for key, value in overrides:
        apply_override(cfg, key, value)
    validate(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as TOML (reads back equal with load_config)."""
    Path(path).write_text(to_toml(cfg))


def describe_config(cfg: Any = None) -> str:
    """A markdown reference of every table and field: name, type, default, documentation."""
    return describe_tables(cfg if cfg is not None else TrainConfig())


# ----------------------------------------------------------------------------- [data] columns, [model] lora

LORA_KEYS = {"r": int, "alpha": (int, float), "dropout": (int, float), "target_modules": (list, str)}
_LORA_TYPES = {"r": "an int", "alpha": "a number", "dropout": "a number", "target_modules": "a list of names"}
_HEAD_NAMES = ("lm_head", "embed_tokens", "embed_out", "wte", "output")


def check_data_columns(columns: Dict[str, Any]) -> None:
    """ConfigError naming data.columns.FIELD unless every value is a column name and no column is mapped twice."""
    seen: Dict[str, str] = {}
    for name, column in columns.items():
        if not isinstance(column, str) or not column:
            raise ConfigError(f"data.columns.{name}", column, "a column name (non-empty string)")
        if column in seen:
            raise ConfigError(f"data.columns.{name}", column, f"a column not already mapped to {seen[column]!r}")
        seen[column] = name


def check_lora_table(lora: Dict[str, Any]) -> None:
    """ConfigError naming model.lora.KEY for an unknown key or a bad value (empty table: LoRA off)."""
    if not lora:
        return
    import importlib.util
    if importlib.util.find_spec("peft") is None:
        raise ConfigError.message("model.lora", "model.lora: LoRA needs the optional extra: pip install "
                                  "'fusedrl[lora]' (the `peft` package)")
    for key, value in lora.items():
        if key not in LORA_KEYS:
            raise ConfigError(f"model.lora.{key}", value, f"one of the keys {sorted(LORA_KEYS)}",
                              f"model.lora.{key}: unknown key; known keys: {', '.join(sorted(LORA_KEYS))}")
        if isinstance(value, bool) or not isinstance(value, LORA_KEYS[key]):
            raise ConfigError(f"model.lora.{key}", value, _LORA_TYPES[key])
    if not isinstance(lora.get("r"), int) or lora["r"] < 1:
        raise ConfigError("model.lora.r", lora.get("r"), "an int >= 1 (the adapters' rank)")
    if "alpha" in lora and not lora["alpha"] > 0:
        raise ConfigError("model.lora.alpha", lora["alpha"], "a number > 0")
    if not 0.0 <= float(lora.get("dropout", 0.0)) < 1.0:
        raise ConfigError("model.lora.dropout", lora["dropout"], "a number in [0, 1)")
    if "target_modules" not in lora:
        return  # PEFT's default targets for the model family (attention projections)
    targets = lora["target_modules"]
    names = [targets] if isinstance(targets, str) else targets
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ConfigError("model.lora.target_modules", targets,
                          'module names, e.g. ["q_proj", "v_proj"], or "all-linear"')
    for name in names:
        if name.rpartition(".")[2] in _HEAD_NAMES:
            raise ConfigError("model.lora.target_modules", targets,
                              f"modules other than the LM head and the embeddings ({name!r}: the fused LM-head "
                              "kernels read the plain head weight, so an adapter there would be ignored)")
