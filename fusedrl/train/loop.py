"""The one training loop every stage runs in.

    result = train(model, stage, cfg, run_dir="runs/x")             # fresh run
    result = train(model, stage, cfg, run_dir="runs/x", resume=True)  # continue from the last checkpoint

A step: the stage produces the step's packed micro-batches; the loop counts the
step's totals on the host (`StepTotals`: trained tokens, sequences, groups over
all micro-batches, and over ranks when distributed) and passes them to every
`stage.loss`, runs forward/backward on each micro-batch (so accumulation equals
one big batch), clips each trainable module by its global norm, syncs once with
the host (loss, grad norms, metrics in one transfer), skips the update when
anything is non-finite, and steps every optimizer and its schedule. The loop
owns one AdamW per module the stage declares (`stage.trainables(model)`: the
policy, and PPO's critic).
"""
from __future__ import annotations

import logging
import math
import resource
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fusedrl.data.batch import PackedBatch
from fusedrl.kernels._ranges import phase_range
from fusedrl.train.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from fusedrl.config import TrainConfig
from fusedrl.train.metrics import MetricsLogger, is_rank0
from fusedrl.stages.base import POLICY, StepTotals
from fusedrl.train.optim import Trained, build_trained
from fusedrl.train.resume import apply_optim_config
from fusedrl.train import dist_step

logger = logging.getLogger("fusedrl")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainState:
    """The loop's counters (saved in every checkpoint's trainer.json)."""

    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    tokens_seen: int = 0


@dataclass
class TrainResult:
    state: TrainState
    last_metrics: Dict[str, float] = field(default_factory=dict)
    eval_metrics: Dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    checkpoint: Optional[Path] = None


# ----------------------------------------------------------------------------- the step

def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def step_totals(batches: Sequence[PackedBatch], device: torch.device) -> StepTotals:
    """Trained tokens, sequences and groups over the step's micro-batches (each at least 1).

    Host ints only on one device. Under torch.distributed the counts are summed
    over ranks and divided by the world size, because data-parallel gradient
    reduction averages over ranks: sum_r (loss_r * W / N) / W = the global mean.
    """
    counts = [float(sum(b.num_tokens for b in batches)), float(sum(b.num_seqs for b in batches)),
              float(sum(b.groups for b in batches))]
    if _distributed():
        total = torch.tensor(counts, device=device)
        torch.distributed.all_reduce(total)
        world = torch.distributed.get_world_size()
        return StepTotals(*(max(c, 1.0) / world for c in total.tolist()))
    return StepTotals(*(max(c, 1.0) for c in counts))  # an all-masked step gives loss 0, not a division by 0


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def _stage_loss(model, stage, batch, totals):
    return stage.loss(model, batch, totals)


def _policy_only_loss(model, stage, batch, totals):
    return stage.loss(model, batch, totals, with_value=False)


def _forward_backward(trained: Dict[str, Trained], stage, batch: PackedBatch, totals: StepTotals, weight: float):
    """The micro-batch's forward/backward: the policy's loss, then each `stage.module_losses()` entry as a
    forward/backward of its own module (PPO's critic: an FSDP2 root of its own under torchrun). Returns the
    summed loss (detached) and metrics, times `weight`."""
    from fusedrl.train.parallel import run_forward

    parts = stage.module_losses() if hasattr(stage, "module_losses") else {}
    policy_fn = _policy_only_loss if parts else _stage_loss
    calls = [(trained[POLICY].module, lambda m, b, t: policy_fn(m, stage, b, t))]
    calls += [(trained[name].module, fn) for name, fn in parts.items()]
    total, merged = None, {}
    for module, fn in calls:
        loss, metrics = run_forward(module, fn, batch, totals)
        if weight != 1.0:
            loss, metrics = loss * weight, {k: torch.as_tensor(v) * weight for k, v in metrics.items()}
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
        merged.update(metrics)
    return total, merged


def train_step(stage, batches: List[PackedBatch], trained: Dict[str, Trained], max_grad_norm: Optional[float],
               device: torch.device, *, totals: Optional[StepTotals] = None,
               padding: Sequence[PackedBatch] = ()) -> Dict[str, float]:
    """Forward/backward over the micro-batches, clip each module, and (if finite) step; returns host floats.

    Every optimizer steps only when the summed loss and every gradient norm are
    finite; `record["nonfinite"]` says whether the step was skipped. The policy's
    norm is "grad_norm", another module's "<name>_grad_norm". This function syncs
    with the host exactly once.

    Data parallel (see `fusedrl.train.dp_split`): `totals` are the step's global counts
    over the world size, and `padding` micro-batches run with their loss multiplied by 0
    (every rank runs as many forwards/backwards as the busiest one). Each loss runs
    through `run_forward`, so on an FSDP2 model the root's weights (the LM head the fused
    ops read) are gathered for it; a stage with `module_losses()` (PPO's critic) gets one
    forward/backward per module and micro-batch.
    """
    totals = totals if totals is not None else step_totals(batches, device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    metric_sums: Dict[str, torch.Tensor] = {}
    for weight, batch in [(1.0, b) for b in batches] + [(0.0, b) for b in padding]:
        with phase_range("forward_backward"):
            loss, metrics = _forward_backward(trained, stage, batch.to(device), totals, weight)
        loss_sum += loss.float()
        for name, value in metrics.items():
            value = torch.as_tensor(value, device=device).detach().float().reshape(())
            metric_sums[name] = metric_sums[name] + value if name in metric_sums else value
    stats: Dict[str, torch.Tensor] = {"loss": loss_sum}  # named: one vector, one host sync
    for name, entry in trained.items():
        params = [p for group in entry.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"), foreach=None)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor on a sharded model
        stats["grad_norm" if name == POLICY else f"{name}_grad_norm"] = norm.to(device, torch.float32)
    checked = list(stats)  # the loss and every gradient norm must be finite for the update
    stats.update(metric_sums)
    vector = torch.stack(list(stats.values()))
    if _distributed():
        torch.distributed.all_reduce(vector, op=torch.distributed.ReduceOp.AVG)
    record = dict(zip(stats, vector.tolist()))  # the one host sync of the step
    finite = all(math.isfinite(record[name]) for name in checked)
    with phase_range("optimizer"):
        for entry in trained.values():
            if finite:
                entry.optimizer.step()
            entry.optimizer.zero_grad(set_to_none=True)
    record["nonfinite"] = not finite
    return record


# ----------------------------------------------------------------------------- signals

class _StopFlag:
    def __init__(self):
        self.signal: Optional[int] = None


@contextmanager
def _graceful_stop():
    """SIGTERM/SIGINT set a flag the loop checks after each step (a checkpoint is then written).

    A second SIGINT interrupts at once. Handlers are installed only in the main thread.
    """
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signal = signum
        logger.warning("received %s: stopping after this step and writing a checkpoint",
                       signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- the loop

def _evaluate(stage, model, extra_eval=None) -> Dict[str, float]:
    """The stage's evaluate(model) and extra_eval(model), merged; model in eval mode, no grad."""
    hooks = [h for h in (getattr(stage, "evaluate", None), extra_eval) if h is not None]
    if not hooks:
        return {}
    was_training = model.training
    model.eval()
    result: Dict[str, float] = {}
    try:
        with torch.no_grad(), dist_step.gathered_all(model, stage):  # full weights on every rank (FSDP2)
            for hook in hooks:
                result.update(hook(model) or {})
    finally:
        model.train(was_training)
    return result


def train(
    model: torch.nn.Module,
    stage,
    cfg: TrainConfig,
    *,
    run_dir: str | Path,
    resume: bool = False,
    on_step_end: Optional[Callable[[int, Dict[str, float]], None]] = None,
    extra_eval: Optional[Callable[[torch.nn.Module], Dict[str, float]]] = None,
) -> TrainResult:
    """Run `cfg.loop.max_steps` optimizer steps of `stage` on `model`.

    Args:
        model: the module to train (its trainable parameters go to AdamW).
        stage: a `fusedrl.stages.base.Stage`.
        cfg: the run's config (optim, schedule, loop, checkpoint, logging are used here).
        run_dir: where metrics.jsonl and checkpoints/ go.
        resume: continue from the newest valid checkpoint in run_dir/checkpoints
            (newer corrupt or partial ones are skipped with a warning).
        on_step_end: called as on_step_end(step, record) after each step (tests, custom hooks).
        extra_eval: called at each evaluation besides stage.evaluate (e.g. a task score);
            its dict is merged into the logged eval metrics.
    Returns:
        A TrainResult: counters, the last step's metrics, the last evaluation.
    Raises:
        NonFiniteError after cfg.loop.max_nonfinite_in_a_row consecutive non-finite steps.
    """
    _check_stage(stage)
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    total = cfg.loop.max_steps
    trained = build_trained(model, stage, cfg)
    # DCP checkpoints under a process group, and for a run resumed from one (e.g. written at 2 ranks, now at 1)
    distributed = dist_step.active() or (resume and dist_step.has_dist_checkpoint(run_dir))
    state = (_resume_dist if distributed else _resume)(run_dir, trained, stage, cfg) if resume else TrainState()
    result = TrainResult(state=state)
    metrics = MetricsLogger(run_dir, total_steps=total, start_step=state.step,
                            progress=cfg.logging.progress, console_every=cfg.logging.console_every, config=cfg)

    def checkpoint() -> Optional[Path]:
        if distributed:  # DCP: sharded, every rank writes its part
            return dist_step.save_checkpoint_dist(run_dir, state.step, trained, stage, state, cfg.checkpoint.keep)
        if not is_rank0():  # full state dicts, one writer
            return None
        policy = trained[POLICY]
        others = {name: tuple(entry) for name, entry in trained.items() if name != POLICY}
        return save_checkpoint(run_dir / "checkpoints", state.step, model=model, optimizer=policy.optimizer,
                               scheduler=policy.scheduler, others=others, stage_state=stage.state_dict(),
                               trainer_state=asdict(state), keep=cfg.checkpoint.keep)

    def evaluate_now() -> None:
        result.eval_metrics = _evaluate(stage, model, extra_eval)
        if result.eval_metrics:
            metrics.log_eval(state.step, result.eval_metrics)

    try:
        with _graceful_stop() as stop:
            if cfg.loop.eval_at_start and state.step == 0:
                evaluate_now()
            while state.step < total:
                with phase_range("step"):
                    record = _run_step(stage, trained, cfg, state, device)
                metrics.log_step(state.step, record)
                result.last_metrics = record
                if on_step_end is not None:
                    on_step_end(state.step, record)
                _check_nonfinite(state, record, cfg.loop.max_nonfinite_in_a_row)
                if cfg.loop.eval_every and state.step % cfg.loop.eval_every == 0 and state.step < total:
                    evaluate_now()
                if stop.signal is not None:
                    result.checkpoint, result.interrupted = checkpoint(), True
                    logger.warning("stopped at step %d; checkpoint %s (continue with --resume)",
                                   state.step, result.checkpoint)
                    return result
                if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and state.step < total:
                    result.checkpoint = checkpoint()
            evaluate_now()
            result.checkpoint = checkpoint()
    finally:
        metrics.close()
    return result


def _check_stage(stage) -> None:
    missing = [name for name in ("micro_batches", "loss", "state_dict", "load_state_dict")
               if not callable(getattr(stage, name, None))]
    missing += [name for name in ("name",) if not isinstance(getattr(stage, name, None), str)]
    if missing:
        raise TypeError(f"stage: {type(stage).__name__} lacks {missing}; a stage implements "
                        "fusedrl.stages.base.Stage (subclass BaseStage for the optional parts)")


def _check_nonfinite(state: TrainState, record: Dict[str, float], limit: int) -> None:
    if state.nonfinite_in_a_row >= limit:
        raise NonFiniteError(
            f"stopping at step {state.step}: {state.nonfinite_in_a_row} steps in a row had a non-finite loss "
            f"or gradient (last: loss={record['loss']}, grad_norm={record['grad_norm']}; {state.skipped_steps} "
            "skipped in all). Lower optim.lr, check the data, or raise loop.max_nonfinite_in_a_row.")


def _run_step(stage, trained: Dict[str, Trained], cfg: TrainConfig, state: TrainState,
              device: torch.device) -> Dict[str, float]:
    """One optimizer step; updates `state` and returns the step's log record."""
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = trained[POLICY].module
    lr = trained[POLICY].scheduler.get_last_lr()[0]
    with phase_range("batches"):  # an RL stage's rollout: its generate / score / logprobs phases nest here
        batches = dist_step.step_batches(stage, model, state.step)  # the global step, the same on every rank
    if not batches:
        raise ValueError(f"stage {stage.name!r}: micro_batches(model, {state.step}) returned no batch")
    extra: Dict[str, float] = {}
    if dist_step.active():
        share, totals = dist_step.split_step(stage, cfg, batches)
        record = train_step(stage, share.batches, trained, cfg.optim.max_grad_norm, device, totals=totals,
                            padding=[share.pad_batch] * share.padding)
        extra = {"dp_load_imbalance": share.imbalance, "micro_batches": len(share.batches) + share.padding}
    else:
        record = train_step(stage, batches, trained, cfg.optim.max_grad_norm, device)
    for entry in trained.values():
        entry.scheduler.step()  # skipped steps advance the schedule too: it follows the step count
    state.step += 1
    tokens = sum(b.total for b in batches)
    state.tokens_seen += tokens
    if record.pop("nonfinite"):
        state.skipped_steps += 1
        state.nonfinite_in_a_row += 1
        logger.warning("step %d: non-finite loss (%s) or grad norm (%s); update skipped (%d in a row)",
                       state.step, record["loss"], record["grad_norm"], state.nonfinite_in_a_row)
    else:
        state.nonfinite_in_a_row = 0
    host_metrics = getattr(stage, "host_metrics", None)
    if host_metrics is not None:
        record.update(host_metrics())
    elapsed = time.perf_counter() - start
    record.update(lr=lr, tokens_per_s=tokens / max(elapsed, 1e-9), memory_gb=peak_memory_gb(device),
                  skipped_steps=state.skipped_steps, micro_batches=len(batches))
    record.update(extra)
    return record


def _resume_dist(run_dir: Path, trained: Dict[str, Trained], stage, cfg: TrainConfig) -> TrainState:
    found = dist_step.resume_dist(run_dir, trained, stage)
    if found is None:
        logger.warning("--resume: no valid checkpoint in %s; starting from step 0", run_dir / "checkpoints")
        return TrainState()
    counters, path = found
    apply_optim_config(trained[POLICY].optimizer, trained[POLICY].scheduler, cfg)
    state = TrainState(**{k: v for k, v in counters.items() if k in TrainState.__dataclass_fields__})
    logger.info("resumed from %s at step %d", path, state.step)
    return state


def _resume(run_dir: Path, trained: Dict[str, Trained], stage, cfg: TrainConfig) -> TrainState:
    path = latest_valid_checkpoint(run_dir / "checkpoints")
    if path is None:
        logger.warning("--resume: no valid checkpoint in %s; starting from step 0", run_dir / "checkpoints")
        return TrainState()
    policy = trained[POLICY]
    others = {name: tuple(entry) for name, entry in trained.items() if name != POLICY}
    restored = load_checkpoint(path, model=policy.module, optimizer=policy.optimizer, scheduler=policy.scheduler,
                               others=others)
    # the configured lr / decay / schedule of the policy, not the saved ones (other trainables keep their own)
    apply_optim_config(policy.optimizer, policy.scheduler, cfg)
    stage.load_state_dict(restored["stage"])
    fields = {k: v for k, v in restored["trainer"].items() if k in TrainState.__dataclass_fields__}
    state = TrainState(**fields)
    logger.info("resumed from %s at step %d", path, state.step)
    return state
