"""The stage interface: what a stage gives the one training loop.

A stage is a batch producer plus an objective. The loop (fusedrl.train.loop.train)
owns everything else: the optimizer, gradient accumulation, clipping, the
schedule, evaluation, checkpoints and logging.

Per optimizer step the loop does

    batches = stage.micro_batches(model, step)            # list[PackedBatch], on the host
    normalizer = sum(b.num_tokens or b.num_seqs for b in batches)   # per stage.normalize_by,
                                                          # summed over ranks when distributed
    for batch in batches:
        loss, metrics = stage.loss(model, batch.to(device), normalizer)
        loss.backward()
    clip, optimizer.step(), scheduler.step()

so a stage whose loss is `sum over the micro-batch / normalizer` gets exactly
the gradient of one big batch. Metrics follow the same rule: each value is the
micro-batch's *additive contribution* (a sum divided by `normalizer`, or a
count), as a 0-d tensor; the loop sums them over the step's micro-batches and
syncs them with the host once per step.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Tuple, runtime_checkable

import torch

from fusedrl.data.batch import PackedBatch

NORMALIZE_BY = ("tokens", "sequences")


@runtime_checkable
class Stage(Protocol):
    """What the loop needs from a stage (see the module docstring).

    Attributes:
        name: short name used in logs and the run folder ("sft", "dpo", ...).
        normalize_by: "tokens" (PackedBatch.num_tokens) or "sequences" (num_seqs):
            what the loss is averaged over across the whole step.
    """

    name: str
    normalize_by: str

    def micro_batches(self, model: torch.nn.Module, step: int) -> List[PackedBatch]:
        """The micro-batches of optimizer step `step` (0-based), on the host.

        RL stages generate here (rollouts) with `model`; data stages ignore it.
        """
        ...

    def loss(self, model: torch.nn.Module, batch: PackedBatch, normalizer: float
             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss, metrics) of one micro-batch already on the model's device.

        loss: 0-d tensor, this micro-batch's share of the step's loss (divide sums by `normalizer`).
        metrics: name -> 0-d tensor, additive contributions (no host sync here).
        """
        ...

    def state_dict(self) -> dict:
        """What must be saved to resume exactly (data position, rollout buffers, ...)."""
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
    normalize_by = "tokens"

    def micro_batches(self, model: torch.nn.Module, step: int) -> List[PackedBatch]:
        raise NotImplementedError(f"{type(self).__name__} must implement micro_batches(model, step)")

    def loss(self, model, batch, normalizer):
        raise NotImplementedError(f"{type(self).__name__} must implement loss(model, batch, normalizer)")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__}: has no state to load, got keys {sorted(state)}")

    def evaluate(self, model: torch.nn.Module) -> Optional[Dict[str, float]]:
        return None

    def host_metrics(self) -> Dict[str, float]:
        return {}
