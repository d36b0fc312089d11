"""`fusedrl profile run CONFIG.toml --steps N`: profile N real training steps of a config.

    fusedrl profile run examples/grpo_tiny.toml --steps 3
    fusedrl profile run my_grpo.toml --steps 5 --warmup 2 --out runs/prof --trace prof.json --top 30
    fusedrl profile run my_sft.toml --steps 5 --optim.lr=1e-5       # overrides as for `fusedrl train`

The run goes through the training entry point (`fusedrl.train.run.run_training`), into a
temporary run folder unless --out is given, with evaluation, periodic checkpoints and the
final save turned off. The first --warmup steps (default 1: Triton compilation, allocator
warm-up) are not profiled; then torch.profiler records N steps. Printed and saved (in
OUT/profile/: phases.json, kernels.txt):

- time per loop phase, from the `fusedrl.phase.*` ranges: step, batches (the stage's
  micro-batches; an RL stage's rollout nests generate / score / logprobs (old and reference
  log-probs) / advantages in it), forward_backward, optimizer, and "other" (the rest of the
  step: gradient clipping, the step's one host sync, metrics); in ms per step and % of the
  step. On CUDA the phases synchronise the device at their edges while profiling (unless
  --no-sync), so host times are device times;
- the fused ops called (`fusedrl.<op>` ranges): calls and time;
- the kernel table: torch.profiler's key_averages, top --top by self device time (CUDA) or
  self CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch

from fusedrl.kernels import _ranges

PHASE_ORDER = ("step", "batches", "generate", "score", "logprobs", "teacher", "advantages", "forward_backward",
               "optimizer")
TOP_LEVEL = ("batches", "forward_backward", "optimizer")  # the phases directly inside "step"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedrl profile run", description=__doc__.splitlines()[0],
                                     epilog="Other --section.field=value arguments override the config.")
    parser.add_argument("config", help="the run's TOML file (as for fusedrl train)")
    parser.add_argument("--steps", type=int, default=3, help="steps to profile (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first, not profiled (default 1)")
    parser.add_argument("--out", default=None, help="run folder (default: a new temporary folder)")
    parser.add_argument("--top", type=int, default=20, help="rows of the kernel table (default 20)")
    parser.add_argument("--trace", default=None, help="also write a torch.profiler Chrome trace here")
    parser.add_argument("--no-sync", action="store_true", help="do not synchronise CUDA at phase edges")
    return parser


def prepare_config(path: str, overrides, steps: int, warmup: int, out: Optional[str]):
    """The run's config with max_steps = warmup + steps, no evaluation, no checkpoint, out_dir set."""
    from fusedrl.train.run import load_run_config

    if steps < 1:
        raise ValueError(f"--steps: expected >= 1, got {steps}")
    if warmup < 0:
        raise ValueError(f"--warmup: expected >= 0, got {warmup}")
    cfg = load_run_config(path, overrides)
    cfg.loop.max_steps = warmup + steps
    cfg.loop.eval_every, cfg.loop.eval_at_start = 0, False
    cfg.checkpoint.every, cfg.checkpoint.save_final = 0, False
    cfg.logging.progress = False
    cfg.run.out_dir = out if out else tempfile.mkdtemp(prefix="fusedrl-profile-")
    if hasattr(cfg.logging, "plots"):
        cfg.logging.plots = False
    return cfg


def _ms(event, attr: str) -> float:
    return float(getattr(event, attr, 0.0) or 0.0) / 1e3


def phase_table(events, steps: int) -> List[dict]:
    """Rows {phase, calls, total_ms, ms_per_step, pct_of_step} from key_averages() of `fusedrl.phase.*`."""
    found = {e.key[len(_ranges.PHASE_PREFIX):]: e for e in events if e.key.startswith(_ranges.PHASE_PREFIX)}
    step_ms = _ms(found["step"], "cpu_time_total") if "step" in found else 0.0
    order = [p for p in PHASE_ORDER if p in found] + sorted(p for p in found if p not in PHASE_ORDER)
    rows = []
    for phase in order:
        total = _ms(found[phase], "cpu_time_total")
        rows.append({"phase": phase, "calls": int(found[phase].count), "total_ms": total,
                     "ms_per_step": total / steps, "pct_of_step": 100.0 * total / step_ms if step_ms else None})
    if step_ms:  # the step outside its top-level phases: gradient clipping, the one host sync, metrics
        rest = step_ms - sum(r["total_ms"] for r in rows if r["phase"] in TOP_LEVEL)
        rows.append({"phase": "other", "calls": int(found["step"].count), "total_ms": rest,
                     "ms_per_step": rest / steps, "pct_of_step": 100.0 * rest / step_ms})
    return rows


def op_table(events) -> List[dict]:
    """Rows {op, calls, total_ms} of the `fusedrl.<op>` ranges, by total time."""
    rows = [{"op": e.key[len(_ranges.PREFIX):], "calls": int(e.count), "total_ms": _ms(e, "cpu_time_total")}
            for e in events if e.key.startswith(_ranges.PREFIX) and not e.key.startswith(_ranges.PHASE_PREFIX)]
    return sorted(rows, key=lambda r: -r["total_ms"])


def kernel_rows(events, top: int, cuda: bool) -> List[dict]:
    """The top `top` events by self device time (CUDA) or self CPU time, fusedrl's own ranges left out."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [{"name": e.key, "calls": int(e.count), "self_cpu_ms": _ms(e, "self_cpu_time_total"),
             "self_device_ms": _ms(e, "self_device_time_total")}
            for e in events if not e.key.startswith(_ranges.PREFIX)]
    rows.sort(key=lambda r: -(r["self_device_ms"] if key.startswith("self_device") else r["self_cpu_ms"]))
    return rows[:top]


def format_report(phases: List[dict], ops: List[dict], kernels: List[dict], steps: int, cuda: bool) -> str:
    lines = [f"phases over {steps} profiled step(s) (fusedrl.phase.* ranges):",
             f"  {'phase':<18} {'calls':>6} {'ms/step':>10} {'% step':>7}"]
    for r in phases:
        pct = f"{r['pct_of_step']:.1f}" if r["pct_of_step"] is not None else "-"
        lines.append(f"  {r['phase']:<18} {r['calls']:>6} {r['ms_per_step']:>10.2f} {pct:>7}")
    lines += ["fused ops (fusedrl.* ranges):", f"  {'op':<26} {'calls':>6} {'total ms':>10}"]
    lines += [f"  {r['op']:<26} {r['calls']:>6} {r['total_ms']:>10.2f}" for r in ops] or ["  (none called)"]
    by = "self device" if cuda else "self CPU"
    lines += [f"top {len(kernels)} kernels / ops by {by} time:",
              f"  {'name':<60} {'calls':>7} {'self CPU ms':>12} {'self dev ms':>12}"]
    lines += [f"  {r['name'][:60]:<60} {r['calls']:>7} {r['self_cpu_ms']:>12.2f} {r['self_device_ms']:>12.2f}"
              for r in kernels]
    return "\n".join(lines)


class _Window:
    """on_step_end hook: start the profiler after `warmup` steps, stop it after `warmup + steps`."""

    def __init__(self, prof, warmup: int, steps: int):
        self.prof, self.warmup, self.stop_at = prof, warmup, warmup + steps
        self.started = self.stopped = False
        if warmup == 0:
            self.start()

    def start(self) -> None:
        self.prof.start()
        self.started = True

    def __call__(self, step: int, record: Dict[str, float]) -> None:
        if step == self.warmup and not self.started:
            self.start()
        elif step == self.stop_at and self.started and not self.stopped:
            self.prof.stop()
            self.stopped = True


def profile_run(cfg, *, steps: int, warmup: int, top: int, trace: Optional[str], sync: bool) -> dict:
    """Train cfg (max_steps = warmup + steps) under torch.profiler; returns the report dict (also saved)."""
    from fusedrl.train.run import run_training

    device = str(cfg.run.device)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=activities)
    window = _Window(prof, warmup, steps)
    _ranges.set_sync_phases(sync)
    try:
        run_training(cfg, on_step_end=window)
    finally:
        _ranges.set_sync_phases(False)
        if window.started and not window.stopped:
            prof.stop()
    events = prof.key_averages()
    report = {"config_out_dir": cfg.run.out_dir, "stage": cfg.run.stage, "steps": steps, "warmup": warmup,
              "phases": phase_table(events, steps), "ops": op_table(events), "kernels": kernel_rows(events, top, cuda)}
    folder = os.path.join(cfg.run.out_dir, "profile")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "phases.json"), "w") as f:
        json.dump(report, f, indent=1)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(os.path.join(folder, "kernels.txt"), "w") as f:
        f.write(events.table(sort_by=sort_by, row_limit=top))
    if trace:
        prof.export_chrome_trace(trace)
    report["folder"] = folder
    report["text"] = format_report(report["phases"], report["ops"], report["kernels"], steps, cuda)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fusedrl.config import parse_overrides

    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        cfg = prepare_config(args.config, overrides, args.steps, args.warmup, args.out)
    except ValueError as err:
        parser.error(str(err))
    print(f"profiling {args.steps} step(s) of {cfg.run.stage} after {args.warmup} warm-up step(s); "
          f"run folder {cfg.run.out_dir}", file=sys.stderr, flush=True)
    report = profile_run(cfg, steps=args.steps, warmup=args.warmup, top=args.top, trace=args.trace,
                         sync=not args.no_sync)
    print(report["text"])
    print(f"wrote {report['folder']}/phases.json and kernels.txt" + (f", {args.trace}" if args.trace else ""))
    return 0
