"""The model card written to OUT_DIR/final/README.md, in the Hugging Face Hub's format.

    write_model_card(run_dir / "final", cfg, result)

YAML front matter (library_name, base_model when the model came from the Hub, tags, pipeline_tag),
then the stage, the base model, the data files with their sha256, the final metrics, the resolved
config and the versions, so `final/` can be uploaded as is (`huggingface-cli upload ORG/NAME final/`).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

STAGE_TAGS = {
    "sft": ["sft"], "reward_model": ["reward-model"], "rejection": ["rejection-sampling"], "dpo": ["dpo"],
    "ppo": ["ppo", "rlhf"], "distill": ["distillation"],
}
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> Optional[str]:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted); None if absent."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def hub_model_id(name: Optional[str]) -> Optional[str]:
    """`name` when it reads as a Hub id ("org/name" or "name", not a local path); the Hub rejects
    a card whose base_model is not a model id, so local folders only appear in the text."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return None
    parts = name.split("/")
    return name if len(parts) <= 2 and all(parts) else None


def _yaml_list(values: List[str]) -> str:
    return "\n".join(f"- {json.dumps(v)}" for v in values)  # JSON strings are YAML strings


def front_matter(cfg: Any) -> str:
    stage = cfg.run.stage
    tags = ["fusedrl", *STAGE_TAGS.get(stage, [stage, "rlhf", "reinforcement-learning"])]
    lines = ["---", "library_name: transformers"]
    base = hub_model_id(cfg.model.name_or_path)
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    lines += ["tags:", _yaml_list(tags)]
    if stage != "reward_model":  # a scalar head is no standard Hub pipeline
        lines.append("pipeline_tag: text-generation")
    return "\n".join(lines + ["---"])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def _data_rows(cfg: Any) -> List[str]:
    rows = ["| split | path | sha256 |", "| --- | --- | --- |"]
    for split in ("train", "eval"):
        path = getattr(cfg.data, split, None)
        if path:
            digest = file_sha256(path)
            rows.append(f"| {split} | `{path}` | {f'`{digest}`' if digest else '(not a local file)'} |")
    return rows


def _metric_rows(metrics: Dict[str, Any]) -> List[str]:
    rows = ["| metric | value |", "| --- | --- |"]
    rows += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"]
    return rows


def model_card(cfg: Any, last_metrics: Dict[str, Any], eval_metrics: Dict[str, Any], *, steps: int) -> str:
    """The card's markdown text (front matter included)."""
    import transformers

    import fusedrl
    from fusedrl.config_io import to_toml

    stage, name = cfg.run.stage, Path(cfg.run.out_dir).name
    base = f"`{cfg.model.name_or_path}`" if cfg.model.name_or_path else (
        f"a `{cfg.model.arch.get('model_type')}` architecture initialised from scratch (`model.arch` below)")
    lines = [front_matter(cfg), "", f"# {name}", "",
             f"Trained with [fusedrl](https://pypi.org/project/fusedrl/) {fusedrl.__version__}, stage `{stage}`, "
             f"{steps} optimizer steps, from {base}.", "",
             "## Training data", "", *_data_rows(cfg), ""]
    if last_metrics:
        lines += ["## Final metrics", "", f"Last training step ({steps}):", "", *_metric_rows(last_metrics), ""]
    if eval_metrics:
        lines += ["Final evaluation:", "", *_metric_rows(eval_metrics), ""]
    lines += ["## Training config", "", "The resolved config (`fusedrl train config.toml` reruns it):", "",
              "```toml", to_toml(cfg).rstrip(), "```", "",
              "## Framework versions", "", f"- fusedrl {fusedrl.__version__}", f"- torch {torch.__version__}",
              f"- transformers {transformers.__version__}", ""]
    return "\n".join(lines)


def write_model_card(final_dir: str | Path, cfg: Any, result: Any) -> Path:
    """Write final_dir/README.md for the run's TrainResult `result`; returns its path."""
    path = Path(final_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model_card(cfg, result.last_metrics, result.eval_metrics, steps=result.state.step))
    return path
