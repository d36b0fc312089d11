"""Run configuration: one small dataclass per component, read from TOML, overridden from the CLI.

A run file is TOML with one table per component:

    [run]        stage to run, output folder, seed, device
    [model]      what to train (hub id / local path, or an architecture built from scratch)
    [data]       where the examples come from and how they are packed
    [optim]      AdamW and gradient clipping
    [schedule]   warm-up then constant / linear / cosine decay
    [loop]       steps, evaluation, non-finite handling
    [checkpoint] how often to save, how many to keep
    [logging]    console, progress bar, plots
    [sft]        options of the SFT stage (later stages add their own table)

Every field is documented by the string literal right under it; `describe_config`
turns those into the reference in docs/engine.md. Command-line overrides are
`--section.field=value` (`--model.arch.hidden_size=64` reaches into a table
field); values are type-checked against the field's annotation. Unknown
sections or keys and ill-typed values raise `ValueError` naming the key.

Adding a stage: write `XConfig` here (fields documented the same way), add one
field `x: XConfig` to `TrainConfig`, and register the stage in
`fusedrl.engine.stages.STAGES`.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class RunConfig:
    stage: str = "sft"
    """Stage to run: a name in `fusedrl.engine.stages.STAGES` ("sft")."""
    out_dir: str = "runs/default"
    """Run folder: resolved config, metrics.jsonl, checkpoints/, final/, plots/, report.md."""
    seed: int = 0
    """Seed of python, numpy and torch RNGs (and of data shuffling)."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N"."""


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


@dataclass
class DataConfig:
    train: str = ""
    """Training examples: a .jsonl or .parquet file (format detected from the first record)."""
    eval: Optional[str] = None
    """Held-out examples in the same format, used by the stage's evaluation; None skips it."""
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
    """Write PNG plots of the logged metrics to OUT_DIR/plots at the end."""


@dataclass
class SFTConfig:
    normalize_by: str = "tokens"
    """Loss normaliser: "tokens" (mean over all trained tokens of the step) or "sequences"
    (per-sequence sums averaged over the step's sequences)."""
    eval_micro_batches: int = 8
    """Micro-batches of data.eval used for the evaluation loss (0: the whole file)."""


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


# Allowed values of string fields, and lower bounds of numeric ones, by "section.field".
CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.overlong": ("truncate", "drop"),
    "data.train_on": ("all_assistant", "last_assistant"),
    "schedule.decay": ("constant", "linear", "cosine"),
    "sft.normalize_by": ("tokens", "sequences"),
}
MINIMUM = {
    "data.max_len": 2, "data.token_budget": 2, "data.micro_batches_per_step": 1,
    "optim.lr": 0.0, "optim.weight_decay": 0.0, "optim.eps": 0.0, "optim.max_grad_norm": 0.0,
    "schedule.warmup_steps": 0, "schedule.min_lr_ratio": 0.0,
    "loop.max_steps": 1, "loop.eval_every": 0, "loop.max_nonfinite_in_a_row": 1,
    "checkpoint.every": 0, "checkpoint.keep": 1, "logging.console_every": 1,
    "sft.eval_micro_batches": 0,
}


# ----------------------------------------------------------------------------- typing

def _type_name(tp) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


def _field_types(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, key: str, *, from_cli: bool = False) -> Any:
    """Check (and for CLI strings, parse) `value` against annotation `tp`.

    Args:
        value: a TOML value, or the raw string of a `--key=value` override when from_cli.
        tp: the field's annotation (int, float, bool, str, List[X], Optional[X], Dict[str, Any]).
        key: "section.field" for error messages.
    Returns:
        The value converted to the field's type (ints widen to float; lists are copied).
    Raises:
        ValueError naming `key`, the value given and the type expected.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, inner[0], key, from_cli=from_cli)
    if from_cli and isinstance(value, str) and tp is not str:
        value = _parse_cli_literal(value, tp)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, List):
        if isinstance(value, (list, tuple)):
            return [coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin in (dict, Dict):
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - a field type this parser does not know is a programming error
        raise TypeError(f"{key}: unsupported field type {tp}")
    raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _parse_cli_literal(text: str, tp: Any) -> Any:
    """Parse the text of a CLI override as a TOML literal; lists may also be "a,b,c"."""
    lowered = text.strip().lower()
    if tp is bool and lowered in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return lowered in ("true", "1", "yes", "on")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
        is_list = typing.get_origin(tp) in (list, List)
        return [value] if is_list and not isinstance(value, list) else value
    except tomllib.TOMLDecodeError:
        pass
    if typing.get_origin(tp) in (list, List):
        item_tp = (typing.get_args(tp) or (str,))[0]
        if "," not in text:
            return [_parse_cli_literal(text, (typing.get_args(tp) or (Any,))[0])]
        return [p.strip() if item_tp is str else _parse_cli_literal(p, item_tp) for p in text.split(",") if p.strip()]
    return text  # left as a string: coerce() reports the type mismatch with the key


# ----------------------------------------------------------------------------- building

def _apply_table(obj: Any, table: Dict[str, Any], prefix: str) -> None:
    """Set the fields of dataclass `obj` from a TOML table, recursing into nested dataclasses."""
    if not isinstance(table, dict):
        raise ValueError(f"{prefix}: expected a table, got {table!r}")
    types = _field_types(type(obj))
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in types:
            known = ", ".join(types)
            raise ValueError(f"unknown config key {key!r}; known keys here: {known}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply_table(current, value, key)
        else:
            setattr(obj, name, coerce(value, types[name], key))


def apply_override(cfg: Any, dotted: str, value: Any, *, from_cli: bool = True) -> None:
    """Set the field at `dotted` ("section.field", or "model.arch.key" inside a table field) in place.

    Args:
        value: the text of a `--a.b=c` override when from_cli, else an already typed (TOML) value.
    """
    parts = dotted.split(".")
    obj = cfg
    for i, name in enumerate(parts):
        key = ".".join(parts[: i + 1])
        types = _field_types(type(obj))
        if name not in types:
            raise ValueError(f"unknown config key {key!r}; known keys here: {', '.join(types)}")
        current = getattr(obj, name)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(current):
                raise ValueError(f"{key}: is a section; override one of its fields ({key}.FIELD=VALUE)")
            setattr(obj, name, coerce(value, types[name], key, from_cli=from_cli))
            return
        if isinstance(current, dict):  # a table field (model.arch): the rest of the path is its key
            parsed = _parse_cli_literal(value, Any) if from_cli and isinstance(value, str) else value
            current[".".join(parts[i + 1:])] = parsed
            return
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{key}: is a {type(current).__name__} field, not a section; use --{key}=VALUE")
        obj = current


def parse_overrides(args: Sequence[str]) -> List[Tuple[str, str]]:
    """Split ["--a.b=c", "--x.y", "z"] into [("a.b", "c"), ("x.y", "z")]."""
    pairs, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ValueError(f"override {arg!r}: expected --section.field=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 1
        else:
            raise ValueError(f"override {arg!r}: missing a value (--{body}=VALUE)")
        pairs.append((key, value))
        i += 1
    return pairs


def validate(cfg: Any, prefix: str = "") -> None:
    """Check choice fields and lower bounds (CHOICES, MINIMUM); raise ValueError naming the key."""
    for f in dataclasses.fields(cfg):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, key)
        elif key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"{key}: expected one of {CHOICES[key]}, got {value!r}")
        elif key in MINIMUM and value is not None and value < MINIMUM[key]:
            raise ValueError(f"{key}: expected a value >= {MINIMUM[key]}, got {value!r}")
    if not prefix and hasattr(cfg, "optim") and len(cfg.optim.betas) != 2:
        raise ValueError(f"optim.betas: expected 2 values, got {cfg.optim.betas!r}")


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
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r}: invalid TOML: {err}") from None
        _apply_table(cfg, table, "")
    for key, value in overrides:
        apply_override(cfg, key, value)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- writing

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        # None entries are dropped: TOML has no null, and transformers configs default them to None.
        items = [(k, v) for k, v in value.items() if v is not None]
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in items) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Any) -> str:
    """Render a config as TOML that `load_config` reads back to an equal config.

    None values are written as comments (TOML has no null); every Optional
    field defaults to None (a test checks it), so reading the file back restores them.
    """
    lines: List[str] = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        lines.append(f"[{f.name}]")
        for sf in dataclasses.fields(section):
            value = getattr(section, sf.name)
            lines.append(f"# {sf.name} = None" if value is None else f"{sf.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(to_toml(cfg))


# ----------------------------------------------------------------------------- reference

def field_docs(cls: type) -> Dict[str, str]:
    """The string literal right under each field of dataclass `cls`, by field name."""
    source = inspect.getsource(cls)
    tree = ast.parse(textwrap.dedent(source))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_config(cfg: Any = None) -> str:
    """A markdown reference of every table and field: name, type, default, documentation."""
    cfg = cfg if cfg is not None else TrainConfig()
    out = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        docs, types = field_docs(type(section)), _field_types(type(section))
        out += [f"### [{f.name}]", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for sf in dataclasses.fields(section):
            default = getattr(section, sf.name)
            shown = "None" if default is None else _toml_value(default)
            out.append(f"| `{sf.name}` | {_type_name(types[sf.name])} | `{shown}` | {docs.get(sf.name, '')} |")
        out.append("")
    return "\n".join(out)
