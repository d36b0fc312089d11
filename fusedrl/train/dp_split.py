"""The loop's data-parallel hook: a step's global micro-batches -> this rank's balanced share.

Every rank builds the same global step (`stage.micro_batches(model, step)`: the
same data position, or the rollout all ranks sampled and gathered), so batch sizes in the config are global
and a step trains on the same sequences at any world size. `rank_share` then

1. unpacks the global micro-batches into units: one sequence, or one whole group
   (a DPO pair, a ranking: batches with `extras["ranking"]`), with each extra
   classified as per-token (first dim = tokens), per-sequence (first dim =
   sequences) or per-group ("ranking", "group_index");
2. splits the units over the ranks with `split_for_ranks` (Karmarkar-Karp on token
   counts, deterministic, the same on every rank);
3. repacks this rank's units into micro-batches of at most `token_budget` tokens
   (best-fit decreasing; the budget stays a per-rank memory cap);
4. pads to the micro-batch count every rank agrees on (`padding` zero-weight copies:
   FSDP2 gathers and reduces in every forward/backward, so counts must match).

The gradient then equals one big batch: the loop divides every loss by the
global counts over the world size (`StepTotals`), and FSDP2 averages gradients
over ranks. The counts are known on every rank (each holds the global list), so
they need no collective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from fusedrl.data.batch import PackedBatch
from fusedrl.packing import cu_seqlens_and_positions, pack_by_budget
from fusedrl.train.dp_balance import load_imbalance, split_for_ranks

GROUP_KEYS = ("ranking", "group_index")


@dataclass
class _Seq:
    """One packed document cut out of a batch (labels and token extras already shifted)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    token: Dict[str, torch.Tensor]
    row: Dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass
class _Unit:
    """What is never split across ranks or micro-batches: a sequence, or a group's members in order."""

    seqs: List[_Seq]
    group: Dict[str, torch.Tensor]  # per-group extras (minus "ranking", rebuilt)
    grouped: bool = False

    def __len__(self) -> int:
        return sum(len(s) for s in self.seqs)


def _classify(batch: PackedBatch) -> Tuple[List[str], List[str], List[str]]:
    """(token keys, sequence keys, group keys) of batch.extras; ValueError on a key that fits none."""
    n, total = batch.num_seqs, batch.total
    token, seq, group = [], [], []
    for key, value in batch.extras.items():
        if key in GROUP_KEYS and batch.num_groups:
            group.append(key)
        elif not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise ValueError(f"batch.extras[{key!r}]: expected a tensor with a token or sequence dimension, "
                             f"got {type(value).__name__}; a data-parallel split cannot place it")
        elif value.shape[0] == total and total != n:
            token.append(key)
        elif value.shape[0] == n and total != n:
            seq.append(key)
        else:
            raise ValueError(f"batch.extras[{key!r}]: first dimension {value.shape[0]} is neither the batch's "
                             f"{total} tokens nor its {n} sequences; a data-parallel split cannot place it")
    return token, seq, group


def unpack(batch: PackedBatch) -> List[_Unit]:
    """The units of one packed micro-batch, in batch order."""
    token_keys, seq_keys, group_keys = _classify(batch)
    bounds = batch.cu_seqlens.tolist()
    seqs = [_Seq(batch.input_ids[s:e], batch.labels[s:e], {k: batch.extras[k][s:e] for k in token_keys},
                 {k: batch.extras[k][i] for k in seq_keys}) for i, (s, e) in enumerate(zip(bounds, bounds[1:]))]
    if not batch.num_groups or "ranking" not in group_keys:
        if batch.num_groups:
            raise ValueError("batch: num_groups > 0 but extras has no 'ranking' naming each group's sequences")
        return [_Unit([s], {}, False) for s in seqs]
    ranking = batch.extras["ranking"]
    others = [k for k in group_keys if k != "ranking"]
    return [_Unit([seqs[i] for i in ranking[g].tolist()], {k: batch.extras[k][g] for k in others}, True)
            for g in range(ranking.shape[0])]


def repack(units: Sequence[_Unit]) -> PackedBatch:
    """One PackedBatch of these units, in order (the inverse of `unpack` for one batch)."""
    seqs = [s for u in units for s in u.seqs]
    lengths = [len(s) for s in seqs]
    cu_seqlens, position_ids = cu_seqlens_and_positions(lengths)
    labels = torch.cat([s.labels for s in seqs])
    extras = {k: torch.cat([s.token[k] for s in seqs]) for k in seqs[0].token}
    extras.update({k: torch.stack([s.row[k] for s in seqs]) for k in seqs[0].row})
    num_groups = 0
    if units[0].grouped:
        size = len(units[0].seqs)
        extras["ranking"] = torch.arange(len(units) * size, dtype=torch.int64).view(len(units), size)
        extras.update({k: torch.stack([u.group[k] for u in units]) for k in units[0].group})
        num_groups = len(units)
    return PackedBatch(input_ids=torch.cat([s.input_ids for s in seqs]), labels=labels, position_ids=position_ids,
                       cu_seqlens=cu_seqlens, max_seqlen=max(lengths), num_tokens=int((labels != -100).sum()),
                       extras=extras, num_groups=num_groups)


@dataclass
class RankShare:
    """This rank's micro-batches, how many zero-weight copies pad them, and the step's max/mean load."""

    batches: List[PackedBatch]
    padding: int
    imbalance: float
    pad_batch: PackedBatch  # what a padding micro-batch runs (its loss is multiplied by 0)


def _assign(lengths: List[int], world: int) -> List[List[int]]:
    if len(lengths) >= world:
        return split_for_ranks(lengths, world)
    return [[r] if r < len(lengths) else [] for r in range(world)]  # fewer units than ranks: some only pad


def rank_share(batches: Sequence[PackedBatch], rank: int, world: int, token_budget: int) -> RankShare:
    """Split the step's global micro-batches over `world` ranks; this rank's share packed under the budget.

    Deterministic and identical on every rank (no collective): each rank computes every rank's
    micro-batch count and pads its own to the maximum.
    """
    if not batches:
        raise ValueError("batches: the step has no micro-batch to split")
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world ({world}), got {rank}")
    units = [u for b in batches for u in unpack(b)]
    grouped = {u.grouped for u in units}
    if len(grouped) > 1:
        raise ValueError("batches: the step mixes grouped and ungrouped micro-batches")
    lengths = [len(u) for u in units]
    budget = max(int(token_budget), max(lengths))  # a unit longer than the budget was packed alone already
    parts = _assign(lengths, world)
    counts, mine = [], []
    for r, part in enumerate(parts):
        bins = pack_by_budget([lengths[i] for i in part], budget) if part else []
        counts.append(len(bins))
        if r == rank:
            mine = [repack([units[i] for i in sorted(part[j] for j in b)]) for b in bins]
    pad = mine[0] if mine else repack([units[0]])
    imbalance = load_imbalance(lengths, parts)
    return RankShare(mine, max(counts) - len(mine), imbalance, pad)
