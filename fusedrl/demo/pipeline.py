"""`fusedrl demo`: the whole pipeline on CPU in minutes, with no download.

    fusedrl demo                     # runs/demo: report.md, metrics.jsonl, plots/, one folder per stage
    fusedrl demo --quick --out /tmp/d
    fusedrl demo --config examples/demo.toml --loop.max_steps=600

A tiny Qwen2 model is initialised from scratch, the character tokenizer gives
it a chat template, and a synthetic task with a checkable answer (reverse a
short word) is generated. The pipeline is a list of stage steps run in order
(`[demo] stages`); each trains the current policy with the one loop and is
scored by greedy exact-match accuracy on held-out prompts, before the first
step and after every step: SFT, reward model, rejection sampling, DPO, GRPO
(verifier reward), PPO (reward-model reward), then distillation of the final policy
into a smaller student (whose own task score the report shows). A new stage adds an entry to `DEMO_STEPS`.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fusedrl.config import TrainConfig, apply_override, load_config, save_config, validate
from fusedrl.demo.alignment import ALIGNMENT_STEPS
from fusedrl.demo.distill import DISTILL_STEPS
from fusedrl.demo.rl import RL_STEPS
from fusedrl.train.metrics import deferred_plots, format_value, plot_lines, read_metrics
from fusedrl.train.plot import line_plot
from fusedrl.demo.tasks import TaskConfig, make_split, sample_completions, score_model

logger = logging.getLogger("fusedrl")
# How the demo reports its wall time (report.md and the last log line); README quotes it
# (tests/test_docs_links.py checks the README's line has this form).
TOTAL_TIME = "total time {:.0f} s"


# The whole RLHF pipeline, in the book's order, then a smaller student distilled from its final policy
# (the distill step runs last and leaves the policy unchanged, so the other scores do not depend on it).
DEFAULT_STAGES = ("sft", "reward_model", "rejection", "dpo", "grpo", "ppo", "distill")


@dataclass
class DemoSection:
    stages: List[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    """Stage steps run in order, each on the policy the previous one produced (names in DEMO_STEPS)."""
    quick: List[str] = field(default_factory=lambda: ["loop.max_steps=250", "loop.eval_every=50", "optim.lr=5e-3",
                                                      "task.max_len=3", "task.eval_size=48"])
    """Overrides ("section.field=value") applied by --quick: a shorter run for tests."""
    stage_overrides: Dict[str, Any] = field(default_factory=dict)
    """Per-stage overrides, e.g. {dpo = {"optim.lr" = 1e-4, "loop.max_steps" = 50}}."""
    max_new_tokens: int = 12
    """Longest greedy completion when scoring."""
    examples_in_report: int = 6
    """Held-out prompts shown with their completions in the report."""


@dataclass
class DemoConfig(TrainConfig):
    """The demo's TOML: every TrainConfig table, plus [task] and [demo]."""

    task: TaskConfig = field(default_factory=TaskConfig)
    demo: DemoSection = field(default_factory=DemoSection)


def default_demo_config() -> DemoConfig:
    """The built-in demo config; examples/demo.toml holds the same values (a test checks it)."""
    cfg = DemoConfig()
    cfg.run.device = "cpu"
    cfg.run.num_threads = 1
    cfg.model.tokenizer = "char"
    cfg.model.arch = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "max_position_embeddings": 128, "tie_word_embeddings": True}
    cfg.model.dtype = "float32"
    cfg.data.max_len = 64
    cfg.data.token_budget = 1024
    cfg.optim.lr = 3e-3
    cfg.optim.betas = [0.9, 0.99]
    cfg.schedule.warmup_steps = 10
    cfg.schedule.min_lr_ratio = 0.1
    cfg.loop.max_steps = 300
    cfg.loop.eval_every = 50
    cfg.loop.eval_at_start = True
    cfg.checkpoint.save_final = True
    cfg.logging.console_every = 25
    return cfg


@dataclass
class DemoContext:
    """What stage steps share: the config, the current policy, the data, the scores so far."""

    cfg: DemoConfig
    out_dir: Path
    tokenizer: Any
    model: torch.nn.Module
    data: Dict[str, Path]
    eval_records: List[Dict[str, str]]
    scores: List[Tuple[str, float]] = field(default_factory=list)
    rows: List[Dict[str, Any]] = field(default_factory=list)

    def score(self, model=None) -> float:
        return score_model(model or self.model, self.tokenizer, self.eval_records,
                           max_new_tokens=self.cfg.demo.max_new_tokens)

    def stage_config(self, stage: str) -> TrainConfig:
        """A TrainConfig for `stage`: the demo's tables, its run folder, its [demo] stage_overrides."""
        cfg = TrainConfig(**{name: copy.deepcopy(getattr(self.cfg, name)) for name in TrainConfig.__dataclass_fields__})
        cfg.run.stage = stage
        cfg.run.out_dir = str(self.out_dir / stage)
        for key, value in self.cfg.demo.stage_overrides.get(stage, {}).items():
            apply_override(cfg, key, value, from_cli=False)
        validate(cfg)
        return cfg


def sft_step(ctx: DemoContext) -> Dict[str, Any]:
    """Supervised fine-tuning on the task's (prompt, answer) pairs."""
    from fusedrl.train.run import run_training

    cfg = ctx.stage_config("sft")
    cfg.data.train, cfg.data.eval = str(ctx.data["train"]), str(ctx.data["eval"])
    # overwrite: a demo run again into the same --out moves the previous sft/ folder aside (sft.old-TIME)
    result = run_training(cfg, overwrite=True, model=ctx.model, tokenizer=ctx.tokenizer,
                          extra_eval=lambda model: {"task_score": ctx.score(model)})
    return {"steps": result.state.step, "final loss": result.last_metrics.get("loss"),
            "eval loss": result.eval_metrics.get("eval/loss", result.eval_metrics.get("loss"))}


# Stage steps of the pipeline, by name. A step trains ctx.model in place (or replaces it)
# and returns numbers for the report; the demo scores the policy after it.
DEMO_STEPS: Dict[str, Callable[[DemoContext], Dict[str, Any]]] = {
    "sft": sft_step,
    **ALIGNMENT_STEPS,  # reward_model, rejection, dpo (fusedrl.demo.alignment)
    **RL_STEPS,  # grpo, ppo (fusedrl.demo.rl)
    **DISTILL_STEPS,  # distill: a smaller student of the final policy (fusedrl.demo.distill)
}


def _write_data(cfg: DemoConfig, out_dir: Path) -> Tuple[Dict[str, Path], List[Dict[str, str]]]:
    split = make_split(cfg.task)
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in split.items():
        paths[name] = data_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths, split["eval"]


def load_demo_config(config_path: Optional[str] = None, overrides: Sequence[Tuple[str, str]] = (),
                     *, quick: bool = False) -> DemoConfig:
    """The demo config: built-in (or a TOML file), then --quick's overrides, then the CLI's."""
    cfg = load_config(config_path, (), cls=DemoConfig, base=default_demo_config())
    pairs = []
    for item in cfg.demo.quick if quick else []:
        if "=" not in item:
            raise ValueError(f"demo.quick: expected 'section.field=value' items, got {item!r}")
        pairs.append(tuple(item.split("=", 1)))
    return load_config(None, [*pairs, *overrides], cls=DemoConfig, base=cfg)


def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, config_path: Optional[str] = None,
             overrides: Sequence[Tuple[str, str]] = ()) -> Dict[str, Any]:
    """Run the demo pipeline and write out_dir/report.md; returns {"scores": [(stage, score)], ...}."""
    from fusedrl.data.tokenizer import build_tokenizer
    from fusedrl.models.causal_lm import build_policy
    from fusedrl.train.run import resolve_device, seed_everything

    cfg = load_demo_config(config_path, overrides, quick=quick)
    unknown = [s for s in cfg.demo.stages if s not in DEMO_STEPS]
    if unknown:
        raise ValueError(f"demo.stages: unknown {unknown}; expected names in {sorted(DEMO_STEPS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.toml")
    start = time.perf_counter()
    seed_everything(cfg.run.seed)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    tokenizer = build_tokenizer(cfg.model)
    model = build_policy(cfg.model, tokenizer, resolve_device(cfg.run.device))
    data, eval_records = _write_data(cfg, out_dir)
    ctx = DemoContext(cfg=cfg, out_dir=out_dir, tokenizer=tokenizer, model=model, data=data, eval_records=eval_records)
    examples = eval_records[: cfg.demo.examples_in_report]
    before = sample_completions(model, tokenizer, examples, max_new_tokens=cfg.demo.max_new_tokens)
    ctx.scores.append(("init", ctx.score()))
    logger.info("demo: task score of the untrained model %.3f", ctx.scores[-1][1])
    with deferred_plots():  # each stage's plots are drawn in a second process while the next one trains
        for name in cfg.demo.stages:
            stage_start = time.perf_counter()
            numbers = DEMO_STEPS[name](ctx)
            ctx.scores.append((name, ctx.score()))
            ctx.rows.append({"stage": name, "score": ctx.scores[-1][1],
                             "seconds": time.perf_counter() - stage_start, **numbers})
            logger.info("demo: task score after %s %.3f (%.0f s)", name, ctx.scores[-1][1], ctx.rows[-1]["seconds"])
        after = sample_completions(ctx.model, tokenizer, examples, max_new_tokens=cfg.demo.max_new_tokens)
    total = time.perf_counter() - start
    _write_summary(ctx, examples, before, after, total)
    logger.info("demo: %s; report %s", TOTAL_TIME.format(total), out_dir / "report.md")
    return {"scores": ctx.scores, "rows": ctx.rows, "seconds": total, "report": out_dir / "report.md"}


def _write_summary(ctx: DemoContext, examples, before: List[str], after: List[str], seconds: float) -> None:
    out = ctx.out_dir
    with (out / "metrics.jsonl").open("w") as handle:
        for i, (stage, score) in enumerate(ctx.scores):
            handle.write(json.dumps({"kind": "score", "step": i, "stage": stage, "task_score": score}) + "\n")
    xs = list(range(len(ctx.scores)))
    line_plot({"task score": (xs, [s for _, s in ctx.scores])}, out / "plots" / "task_score.png",
              title="task score by stage", xlabel=" ".join(f"{i}={s}" for i, (s, _) in enumerate(ctx.scores)))
    cfg = ctx.cfg
    n_params = sum(p.numel() for p in ctx.model.parameters())
    lines = [
        "# fusedrl demo", "",
        f"Task: **{cfg.task.kind}** ({cfg.task.train_size} training examples, {len(ctx.eval_records)} held-out "
        f"prompts, exact match of the greedy completion). Model: {cfg.model.arch.get('model_type')} with "
        f"{n_params:,} parameters, initialised from scratch; character tokenizer; device {cfg.run.device}; "
        f"{TOTAL_TIME.format(seconds)}.", "",
        "## Task score by stage", "",
        "| stage | task score | seconds | details |", "| --- | --- | --- | --- |",
        f"| init (untrained) | {ctx.scores[0][1]:.3f} | | |",
    ]
    for row in ctx.rows:
        details = ", ".join(f"{k} {format_value(v)}" for k, v in row.items()
                            if k not in ("stage", "score", "seconds") and v is not None)
        lines.append(f"| {row['stage']} | {row['score']:.3f} | {row['seconds']:.0f} | {details} |")
    lines += ["", "![task score](plots/task_score.png)", "", "## Held-out examples", "",
              "| prompt | answer | before | after |", "| --- | --- | --- | --- |"]
    def show(text: str) -> str:
        return f"`{text}`" if text.strip() else "(empty)"

    for record, b, a in zip(examples, before, after):
        lines.append(f"| `{record['prompt']}` | `{record['answer']}` | {show(b)} | {show(a)} |")
    for row in ctx.rows:
        stage_dir = out / row["stage"]
        plots = plot_lines(stage_dir / "plots", f"{row['stage']}/plots", f"## {row['stage']}: training curves")
        lines += [""] + plots if plots else []
    (out / "report.md").write_text("\n".join(lines) + "\n")
