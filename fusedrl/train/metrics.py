"""Run metrics: one JSONL record per step, a console line, a progress bar, PNG plots, a report.

    metrics.jsonl   {"kind": "train", "step": 3, "loss": ..., "grad_norm": ..., "lr": ..., ...}
                    {"kind": "eval",  "step": 10, "eval/loss": ..., ...}
    plots/*.png     one plot per metric (train and eval series of one name share a plot)
    report.md       a summary table and the plots

Only rank 0 writes or prints when torch.distributed is initialised.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from fusedrl.train.plot import line_plot

logger = logging.getLogger("fusedrl")

# Keys shown first on the console line, in this order; the rest follow alphabetically.
_CONSOLE_ORDER = ("loss", "grad_norm", "lr", "tokens_per_s", "memory_gb")
_NOT_PLOTTED = ("kind", "step", "skipped_steps", "nonfinite", "micro_batches", "epoch")


def is_rank0() -> bool:
    """True unless torch.distributed is initialised and this is not rank 0."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def format_value(value) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def format_line(step: int, total: int, record: Dict[str, float]) -> str:
    """The console line of one step: "step 3/100 | loss 1.234 | grad_norm 0.5 | ..."."""
    keys = [k for k in _CONSOLE_ORDER if k in record]
    keys += sorted(k for k in record if k not in keys and k not in ("kind", "step"))
    return " | ".join([f"step {step}/{total}"] + [f"{k} {format_value(record[k])}" for k in keys])


class MetricsLogger:
    """Writes metrics.jsonl, prints the step line and drives the progress bar.

    Args:
        run_dir: the run folder (metrics.jsonl is appended to, so a resumed run continues it).
        total_steps: the run's last step (for the line and the bar).
        start_step: steps already done (a resumed run).
        progress: show a rich progress bar (only when stderr is a terminal).
        console_every: print the step line every this many steps.
    """

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 progress: bool = True, console_every: int = 1):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.console_every = console_every
        self.enabled = is_rank0()
        self._progress = None
        self._task = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if start_step == 0 and self.path.exists():
                self.path.unlink()  # a fresh run does not continue an old file
            if progress and sys.stderr.isatty():
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
                self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                          TimeRemainingColumn(), transient=True)
                self._progress.start()
                self._task = self._progress.add_task("train", total=total_steps, completed=start_step)

    def _write(self, record: Dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")

    def log_step(self, step: int, record: Dict[str, float]) -> None:
        """Record step `step` (host floats only: the loop synced once already)."""
        if not self.enabled:
            return
        self._write({"kind": "train", "step": step, **record})
        if step % self.console_every == 0 or step == self.total_steps:
            logger.info(format_line(step, self.total_steps, record))
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log_eval(self, step: int, record: Dict[str, float]) -> None:
        """Record an evaluation at `step`; keys are prefixed with "eval/"."""
        if not self.enabled:
            return
        record = {k if k.startswith("eval/") else f"eval/{k}": v for k, v in record.items()}
        self._write({"kind": "eval", "step": step, **record})
        logger.info("eval at step %d: %s", step, ", ".join(f"{k} {format_value(v)}" for k, v in record.items()))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def read_metrics(path: str | Path) -> List[Dict]:
    """The records of a metrics.jsonl file (a torn last line, from a killed run, is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: Iterable[Dict], key: str, kind: Optional[str] = None):
    """(steps, values) of `key` over the records (of `kind` if given), later duplicates winning.

    A resumed run re-logs the steps after its checkpoint; keeping the last
    record per step makes the series the one of the run that finished.
    """
    by_step = {}
    for record in records:
        if key in record and (kind is None or record.get("kind") == kind):
            by_step[record["step"]] = record[key]
    steps = sorted(by_step)
    return steps, [float(by_step[s]) for s in steps]


def write_plots(records: List[Dict], out_dir: str | Path, *, prefix: str = "") -> List[Path]:
    """One PNG per metric under out_dir: train key `k` and eval key `eval/k` share a plot."""
    out_dir = Path(out_dir)
    keys = []
    for record in records:
        for key, value in record.items():
            if key not in _NOT_PLOTTED and key not in keys and isinstance(value, (int, float)):
                keys.append(key)
    written = []
    for key in keys:
        if key.startswith("eval/") and key[5:] in keys:
            continue  # drawn with its train counterpart
        curves = {key: series(records, key)}
        if f"eval/{key}" in keys:
            curves = {"train": curves[key], "eval": series(records, f"eval/{key}")}
        name = (prefix + key).replace("/", "_")
        written.append(line_plot(curves, out_dir / f"{name}.png", title=f"{prefix}{key}"))
    return written


def summary_table(records: List[Dict]) -> str:
    """Markdown table: each metric's first and last value (and best for eval keys)."""
    keys = []
    for record in records:
        keys += [k for k, v in record.items() if k not in _NOT_PLOTTED and k not in keys and isinstance(v, (int, float))]
    rows = ["| metric | first | last |", "| --- | --- | --- |"]
    for key in keys:
        steps, values = series(records, key)
        if values:
            rows.append(f"| {key} | {format_value(values[0])} (step {steps[0]}) | "
                        f"{format_value(values[-1])} (step {steps[-1]}) |")
    return "\n".join(rows)


def time_split_table(records: List[Dict]) -> str:
    """Markdown table of where a step's host time goes: mean seconds per `time_<phase>` metric and its share.

    RL stages log time_generate, time_score, time_logprobs (old / reference log-probs), time_advantages
    and time_update; "" when no record has a time_ metric.
    """
    totals: Dict[str, List[float]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("time_") and isinstance(value, (int, float)) and math.isfinite(value):
                totals.setdefault(key[len("time_"):], []).append(float(value))
    if not totals:
        return ""
    means = {phase: sum(v) / len(v) for phase, v in totals.items()}
    whole = sum(means.values()) or 1.0
    rows = ["| phase | mean seconds per step | share |", "| --- | --- | --- |"]
    rows += [f"| {phase} | {format_value(sec)} | {100 * sec / whole:.0f}% |"
             for phase, sec in sorted(means.items(), key=lambda kv: -kv[1])]
    return "\n".join(rows)


def write_report(run_dir: str | Path, *, title: str, extra: str = "") -> Path:
    """Write run_dir/report.md from metrics.jsonl and the PNGs in run_dir/plots."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    lines = [f"# {title}", ""]
    if extra:
        lines += [extra, ""]
    lines += ["## Metrics", "", summary_table(records), ""]
    split = time_split_table(records)
    if split:
        lines += ["## Where a step's time goes", "", split, ""]
    plots = sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
