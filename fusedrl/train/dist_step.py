"""What the loop does differently under a process group (torchrun): the step's data, checkpoints, resume.

One process never reaches this module's collectives: `world() == 1` keeps today's
path (and today's checkpoint format) unchanged.

- `step_batches`: every rank builds the step's *global* micro-batches. A stage that
  samples (it has a `rollout` table: the GRPO family, PPO, on-policy distillation) does
  it with the gathered (unsharded) policy; the memory the gathered copy costs is logged
  once. Its sampling is divided (`fusedrl.rollout.completions.sample_rollout_divided`):
  each rank samples and scores its share of the step's prompts, whole groups on one rank,
  and all shares are gathered, so every rank builds its batches from the same global
  rollout. A sampling stage that does not divide (no `divides_rollout` attribute) samples
  everything on every rank and rank 0's batches are broadcast (generation on GPUs is not
  bitwise reproducible across devices). The list is then split across ranks
  (`fusedrl.train.dp_split.rank_share`).
- `save_checkpoint_dist` / `resume_dist`: DCP checkpoints (sharded model and optimizer,
  the loop's counters, per-rank RNG). The stage's state (data position, rollout buffer,
  sampling RNG) is the same on every rank, because every rank walks the global stream,
  so it is saved once (rank 0, `shared.pt`) and restored at any world size.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from fusedrl.data.batch import PackedBatch
from fusedrl.stages.base import POLICY, StepTotals
from fusedrl.train.dp_split import RankShare, rank_share

logger = logging.getLogger("fusedrl")


def active() -> bool:
    """Whether a process group exists (torchrun, also at world size 1: FSDP2 on one GPU)."""
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def samples(stage) -> bool:
    """Whether the stage generates with the policy in `micro_batches` (it has a [rollout] table)."""
    return getattr(stage, "rollout", None) is not None


def token_budget(stage, cfg) -> int:
    """The per-rank micro-batch cap: the rollout's token_budget for sampling stages, else data.token_budget."""
    rollout = getattr(stage, "rollout", None)
    return int(getattr(rollout, "token_budget", 0) or cfg.data.token_budget)


def gathered(model: torch.nn.Module):
    """`gathered_params(model)` on an FSDP2 model (full weights: generation, evaluation), else a no-op."""
    from fusedrl.train.parallel import gathered_params, is_sharded

    return gathered_params(model) if active() and is_sharded(model) else nullcontext(None)


def frozen_models(stage) -> List[torch.nn.Module]:
    """The frozen models of a sampling stage: the RL reference model (`stage.ref_model`, beta > 0), the
    reward model of its reward source (`stage.rewards.reward_model`) and a distillation teacher
    (`stage.teacher` of the distill stage, `stage.distill_teacher` of the RL stages: `teachers(stage)`).

    They are sharded like the policy and gathered with it for the rollout (the teacher's hidden states
    and per-token KL are computed there); the loss reads a sharded teacher's LM head through
    `Teacher.head()`, which gathers the head once.
    """
    found = [getattr(stage, "ref_model", None), getattr(getattr(stage, "rewards", None), "reward_model", None),
             *[t.model for t in teachers(stage)]]
    out: List[torch.nn.Module] = []
    for module in found:
        if isinstance(module, torch.nn.Module) and not any(module is m for m in out) \
                and not any(p.requires_grad for p in module.parameters()):
            out.append(module)
    return out


def other_trained(stage, model: torch.nn.Module) -> List[torch.nn.Module]:
    """The modules the stage trains besides the policy (PPO's critic), from `stage.trainables(model)`."""
    from fusedrl.stages.base import POLICY

    trainables = stage.trainables(model) if hasattr(stage, "trainables") else {}
    return [t.module for name, t in trainables.items() if name != POLICY and t.module is not model]


def teachers(stage) -> list:
    """The stage's distillation teachers (`fusedrl.rollout.teacher.Teacher`): the distill stage's
    `teacher`, the RL stages' `distill_teacher`."""
    found = [getattr(stage, "teacher", None), getattr(stage, "distill_teacher", None)]
    return [t for t in found if hasattr(t, "prepare_sharding")]


@contextmanager
def gathered_all(model: torch.nn.Module, stage):
    """The policy, the other trained modules (the critic's rollout values) and the stage's sharded frozen
    models gathered together; yields the policy's report."""
    with ExitStack() as stack:
        report = stack.enter_context(gathered(model))
        for other in other_trained(stage, model) + (frozen_models(stage) if samples(stage) else []):
            stack.enter_context(gathered(other))
        yield report


_logged_gather = [False]


def step_batches(stage, model: torch.nn.Module, step: int) -> List[PackedBatch]:
    """The step's global micro-batches, identical on every rank."""
    if not samples(stage):
        return stage.micro_batches(model, step)
    with gathered_all(model, stage) as report:
        if report is not None and not _logged_gather[0]:
            _logged_gather[0] = True
            measured = "" if report.device_delta_bytes is None else \
                f" (measured on the device: {report.device_delta_bytes / 2**20:.1f} MiB)"
            logger.info("rollout on the gathered policy: %.1f MiB of full weights next to the %.1f MiB shard per "
                        "rank%s", report.extra_bytes / 2**20, report.sharded_bytes / 2**20, measured)
        batches = stage.micro_batches(model, step)
    if world() > 1 and not getattr(stage, "divides_rollout", False):
        box = [batches if rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        batches = box[0]
    return batches


def split_step(stage, cfg, batches: List[PackedBatch]) -> Tuple[RankShare, StepTotals]:
    """This rank's share of the global step and the loss normaliser (global counts / world size)."""
    w = world()
    counts = [float(sum(b.num_tokens for b in batches)), float(sum(b.num_seqs for b in batches)),
              float(sum(b.groups for b in batches))]
    totals = StepTotals(*(max(c, 1.0) / w for c in counts))
    return rank_share(batches, rank(), w, token_budget(stage, cfg)), totals


# ----------------------------------------------------------------------------- checkpoints

def has_dist_checkpoint(run_dir: Path) -> bool:
    """Whether run_dir/checkpoints holds a DCP checkpoint (a step folder with dcp/)."""
    return any(p.is_dir() for p in (Path(run_dir) / "checkpoints").glob("step_*/dcp"))


def save_checkpoint_dist(run_dir: Path, step: int, trained: Dict, stage, state, keep: int) -> Optional[Path]:
    """A DCP checkpoint of every trained module and its optimizer, sharded (a collective: every rank calls it).

    The policy is the checkpoint's model; the others (PPO's critic) go in its `others`; the schedulers
    (equal on every rank) go in shared.pt.
    """
    from fusedrl.train.dist_checkpoint import save_dist_checkpoint

    policy = trained[POLICY]
    shared = {"scheduler": policy.scheduler.state_dict(), "stage": stage.state_dict() if rank() == 0 else {},
              "schedulers": {name: e.scheduler.state_dict() for name, e in trained.items() if name != POLICY}}
    return save_dist_checkpoint(run_dir / "checkpoints", step, model=policy.module, optimizer=policy.optimizer,
                                trainer_state=asdict(state), shared_state=shared, keep=keep,
                                others=_others(trained))


def resume_dist(run_dir: Path, trained: Dict, stage) -> Optional[Tuple[dict, Path]]:
    """Load the newest valid DCP checkpoint into the trained modules, optimizers, schedulers and stage (every rank)."""
    from fusedrl.train.dist_checkpoint import latest_dist_checkpoint, load_dist_checkpoint

    root = run_dir / "checkpoints"
    path = latest_dist_checkpoint(root) if root.is_dir() else None
    if path is None:
        return None
    policy = trained[POLICY]
    saved = torch.load(path / "shared.pt", weights_only=True).get("schedulers", {})
    others = sorted(name for name in trained if name != POLICY)
    if sorted(saved) != others:
        raise ValueError(f"checkpoint {path}: holds trained modules {sorted(saved)} besides the policy, this stage "
                         f"trains {others}; resume with the same stage")
    restored = load_dist_checkpoint(path, model=policy.module, optimizer=policy.optimizer, others=_others(trained))
    policy.scheduler.load_state_dict(restored["shared"]["scheduler"])
    for name in others:
        trained[name].scheduler.load_state_dict(saved[name])
    stage.load_state_dict(restored["shared"]["stage"])
    return restored["trainer"], path


def _others(trained: Dict) -> Dict[str, tuple]:
    """Every trained module besides the policy with its optimizer (sharded like the policy under torchrun)."""
    return {name: (entry.module, entry.optimizer) for name, entry in trained.items() if name != POLICY}
