"""The stage contract: what a stage gives the one training loop, and what the loop gives it back.

A stage is a batch producer plus an objective. The loop (fusedrl.train.loop.train)
owns everything else: every optimizer (one AdamW per trainable module the stage
declares), gradient accumulation, clipping, the schedule, evaluation,
checkpoints and logging.

Per optimizer step the loop does

    batches = stage.micro_batches(model, step)          # list[PackedBatch], on the host
    totals = step_totals(batches)                        # StepTotals(tokens, sequences, groups): host
                                                         # counts over the step (summed over ranks)
    for batch in batches:
        loss, metrics = stage.loss(model, batch.to(device), totals)
        loss.backward()
    for each trainable: clip, optimizer.step(), scheduler.step()

so a stage whose loss is `sum over the micro-batch / the step's total` gets
exactly the gradient of one big batch. Metrics follow the same rule: each value
is the micro-batch's *additive contribution* (a sum divided by a step total, or
a count), as a 0-d tensor; the loop sums them over the step's micro-batches and
syncs them with the host once per step.

Models the stage trains besides the policy (PPO's critic) are declared by
`trainables(model)`; the loop builds, steps and checkpoints (safetensors) their
optimizers. Frozen models (a reference, a reward model) are built from the
config when the stage is built and are never part of `state_dict()`, which
returns what must be saved to resume (data position, rollout buffer, RNG) and
never changes training state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch

from fusedrl.data.batch import PackedBatch

NORMALIZE_BY = ("tokens", "sequences")
POLICY = "policy"  # the name of the trainable the loop is given as `model`


class StepTotals(NamedTuple):
    """Counts over all micro-batches of one optimizer step (and over ranks: sum / world size).

    tokens: trained tokens (labels != IGNORE_INDEX); sequences: packed documents;
    groups: preference pairs / rankings (PackedBatch.num_groups; one per sequence elsewhere).
    Each is at least 1, so an all-masked step gives a zero loss, not a division by zero.
    """

    tokens: float
    sequences: float
    groups: float

    def of(self, normalize_by: str) -> float:
        """The total named by a stage's `normalize_by` ("tokens" or "sequences")."""
        if normalize_by not in NORMALIZE_BY:
            raise ValueError(f"normalize_by: expected one of {NORMALIZE_BY}, got {normalize_by!r}")
        return self.tokens if normalize_by == "tokens" else self.sequences


@dataclass
class Trainable:
    """A module the loop trains with its own AdamW (and checkpoints as safetensors).

    lr: None follows optim.lr and the schedule; a number is a constant learning rate.
    weight_decay: None applies optim.weight_decay to matrices and none to vectors;
        a number applies to every parameter.
    betas, eps: None takes optim.betas / optim.eps.
    """

    module: torch.nn.Module
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: Optional[Tuple[float, float]] = None
    eps: Optional[float] = None


@runtime_checkable
class Stage(Protocol):
    """What the loop needs from a stage (see the module docstring).

    Attributes:
        name: short name used in logs and the run folder ("sft", "dpo", ...).
    """

    name: str

    def micro_batches(self, model: torch.nn.Module, step: int) -> List[PackedBatch]:
        """The micro-batches of optimizer step `step` (0-based), on the host.

        RL stages generate here (rollouts) with `model`; data stages ignore it.
        """
        ...

    def loss(self, model: torch.nn.Module, batch: PackedBatch, totals: StepTotals
             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss, metrics) of one micro-batch already on the model's device.

        loss: 0-d tensor, this micro-batch's share of the step's loss (divide sums by a step total).
        metrics: name -> 0-d tensor, additive contributions (no host sync here).
        """
        ...

    def trainables(self, model: torch.nn.Module) -> Dict[str, Trainable]:
        """The modules to train, by name; "policy" is `model` (BaseStage: just the policy)."""
        ...

    def state_dict(self) -> dict:
        """What must be saved to resume exactly (data position, rollout buffers, ...); no side effects."""
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


class BaseStage:
    """Defaults for the optional parts of a stage; subclass and fill in the rest.

    Optional hooks the loop calls when present:
        evaluate(model) -> dict[str, float]: run with model.eval() and torch.no_grad().
        host_metrics() -> dict[str, float]: host-side numbers of the last step (timings, ...).
    """

    name = "stage"

    def trainables(self, model: torch.nn.Module) -> Dict[str, Trainable]:
        return {POLICY: Trainable(model)}

    def micro_batches(self, model: torch.nn.Module, step: int) -> List[PackedBatch]:
        raise NotImplementedError(f"{type(self).__name__} must implement micro_batches(model, step)")

    def loss(self, model, batch, totals: StepTotals):
        raise NotImplementedError(f"{type(self).__name__} must implement loss(model, batch, totals)")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__}: has no state to load, got keys {sorted(state)}")

    def evaluate(self, model: torch.nn.Module) -> Optional[Dict[str, float]]:
        return None

    def host_metrics(self) -> Dict[str, float]:
        return {}


def sampling_generator(stage, model: torch.nn.Module) -> torch.Generator:
    """A sampling stage's resumable random stream, on the policy's device (multinomial needs them to match).

    The stage holds `seed`, `generator` (None until first use) and `_generator_state` (a state
    restored from a checkpoint, applied when the generator is first built on the device).
    """
    device = next(model.parameters()).device
    if stage.generator is None or stage.generator.device != device:
        stage.generator = torch.Generator(device=device).manual_seed(stage.seed)
        if stage._generator_state is not None:
            stage.generator.set_state(stage._generator_state)
            stage._generator_state = None
    return stage.generator
