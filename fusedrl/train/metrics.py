"""Run metrics: one JSONL record per step, a console line, a progress bar, PNG plots, a report.

    metrics.jsonl   {"kind": "train", "step": 3, "loss": ..., "grad_norm": ..., "lr": ..., ...}
                    {"kind": "eval",  "step": 10, "eval/loss": ..., ...}
    plots/*.png     one plot per metric (train and eval series of one name share a plot), noisy
                    series smoothed (EMA over the faint raw values); plots/overview.png: all of them
    report.md       a summary table and the overview figure (links to the per-metric plots)
    sinks           TensorBoard and Weights & Biases when [logging] asks (fusedrl.train.sinks)

Only rank 0 writes or prints when torch.distributed is initialised.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from fusedrl.train.plot import stage_figure

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
        config: the run's config; its [logging] table opens the TensorBoard / W&B sinks (rank 0).
    """

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 progress: bool = True, console_every: int = 1, config=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.console_every = console_every
        self.enabled = is_rank0()
        self._progress = None
        self._task = None
        self.sinks: list = []
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
            if config is not None:
                from fusedrl.train.sinks import open_sinks
                self.sinks = open_sinks(self.run_dir, config)

    def _write(self, record: Dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")

    def log_step(self, step: int, record: Dict[str, float]) -> None:
        """Record step `step` (host floats only: the loop synced once already)."""
        if not self.enabled:
            return
        self._write({"kind": "train", "step": step, **record})
        for sink in self.sinks:
            sink.log(step, record, "train")
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
        for sink in self.sinks:
            sink.log(step, record, "eval")
        logger.info("eval at step %d: %s", step, ", ".join(f"{k} {format_value(v)}" for k, v in record.items()))

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
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


OVERVIEW = "overview.png"  # the stage's one figure (a panel per metric) that report.md shows


def plotted_keys(records: List[Dict]) -> List[str]:
    """The numeric metrics of `records` in first-seen order (bookkeeping keys left out)."""
    keys = []
    for record in records:
        for key, value in record.items():
            if key not in _NOT_PLOTTED and key not in keys and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                keys.append(key)
    return keys


def write_plots(records: List[Dict], out_dir: str | Path, *, prefix: str = "", title: str = "") -> List[Path]:
    """out_dir/overview.png with every metric in one figure (train key `k` and eval key `eval/k`
    share a panel), and one PNG per metric under out_dir: that metric's panel, cut from the one
    drawn figure. Noisy series are drawn smoothed (EMA over faint raw values, see
    `fusedrl.train.plot`). Returns the per-metric PNGs written."""
    out_dir = Path(out_dir)
    keys = plotted_keys(records)
    panels = {}
    for key in keys:
        if key.startswith("eval/") and key[5:] in keys:
            continue  # drawn with its train counterpart
        curves = {key: series(records, key)}
        if f"eval/{key}" in keys:
            curves = {"train": curves[key], "eval": series(records, f"eval/{key}")}
        panels[prefix + key] = curves
    paths = {name: out_dir / f"{name.replace('/', '_')}.png" for name in panels}
    if panels:  # one figure drawn; the per-metric PNGs are its panels, cut out
        args, kwargs = (panels, out_dir / f"{prefix}{OVERVIEW}"), {"title": title, "panel_paths": paths}
        if _deferred is not None:
            _deferred["futures"].append(_deferred["pool"].submit(stage_figure, *args, **kwargs))
        else:
            stage_figure(*args, **kwargs)
    return list(paths.values())


# Inside `deferred_plots()`: {"pool": a one-process executor, "futures": [...], "reports": {run_dir: kwargs}}.
_deferred: Optional[dict] = None


@contextlib.contextmanager
def deferred_plots():
    """Inside this block `write_plots` hands its figure to a second process and returns at once
    (the paths it returns are written by the time the block exits), so a caller with more work
    (the demo's next stage) goes on while the plots are drawn on another core. On exit: waits
    for every figure (a drawing's error is raised there), then writes again each report.md that
    `write_report` wrote meanwhile, now that its plots exist. Nested blocks join the outer one."""
    global _deferred
    if _deferred is not None:
        yield
        return
    import concurrent.futures
    import multiprocessing

    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    _deferred = state = {"pool": pool, "futures": [], "reports": {}}
    try:
        yield
    except BaseException:
        _deferred = None
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    _deferred = None
    try:
        for future in state["futures"]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for run_dir, kwargs in state["reports"].items():
        write_report(run_dir, **kwargs)





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


def plot_lines(plots_dir: Path, link_prefix: str, heading: str = "## Plots") -> List[str]:
    """Markdown for a stage's plots: its overview figure, then links to the per-metric PNGs
    (every PNG embedded when there is no overview, as written before write_plots drew one)."""
    plots = sorted(p for p in plots_dir.glob("*.png") if p.name != OVERVIEW) if plots_dir.is_dir() else []
    if not plots:
        return []
    lines = [heading, ""]
    if (plots_dir / OVERVIEW).is_file():
        lines += [f"![{Path(OVERVIEW).stem}]({link_prefix}/{OVERVIEW})", "",
                  "Per metric: " + ", ".join(f"[{p.stem}]({link_prefix}/{p.name})" for p in plots)]
    else:
        lines += [f"![{p.stem}]({link_prefix}/{p.name})" for p in plots]
    return lines


def write_report(run_dir: str | Path, *, title: str, extra: str = "") -> Path:
    """Write run_dir/report.md from metrics.jsonl and the PNGs in run_dir/plots."""
    run_dir = Path(run_dir)
    if _deferred is not None:  # its plots may still be drawing: written again when they are
        _deferred["reports"][run_dir] = {"title": title, "extra": extra}
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    lines = [f"# {title}", ""]
    if extra:
        lines += [extra, ""]
    lines += ["## Metrics", "", summary_table(records), ""]
    split = time_split_table(records)
    if split:
        lines += ["## Where a step's time goes", "", split, ""]
    lines += plot_lines(run_dir / "plots", "plots")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
