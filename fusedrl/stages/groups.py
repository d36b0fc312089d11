"""Groups of completions of one prompt, packed together: the data layer of the preference stages.

A group is the K completions of one prompt that one loss term compares:
(chosen, rejected) for pairwise reward models and DPO (K = 2), a ranking best
first for Plackett-Luce (K >= 2), (example, mismatched example) for KTO's
reference point. A group is never split across micro-batches: groups are the
units the packer bins, so every pair of a prompt is in one batch.

    dataset = GroupedDataset(examples, groups, token_budget=512, seed=0, extras=per_example)
    (batch,) = dataset.next_batches(1)
    batch.extras["ranking"]     # (G, K) int64: sequence index in the batch of group g's k-th member
    batch.extras["completion_len"]  # (num_seqs,) float32: trained (completion) tokens of each sequence

Sequences of a batch are laid out group by group, members in group order, so
``ranking = arange(G * K).view(G, K)``; it is stored so the losses never assume it.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence

import torch

from fusedrl.data.batch import PackedBatch
from fusedrl.data.records import Example
from fusedrl.data.packed import EpochBins, build_batch
from fusedrl.packing import pack_by_budget
from fusedrl.data.validate import DataError


def sequence_sums(values: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sum per-token values over each packed sequence.

    Args:
        values: (total,) float per-token values (0 where they must not count).
        cu_seqlens: (num_seqs + 1,) int32 boundaries.
        total: number of tokens, a host int (so the op needs no host sync).

    Returns:
        (num_seqs,) sums in values' dtype, differentiable w.r.t. values.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths,
                                     output_size=total)  # (total,)
    return values.new_zeros(lengths.numel()).index_add(0, seq_id, values)


def completion_token_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(total,) bool: True on tokens that are completion (trained) tokens themselves.

    Labels are shifted (labels[t] is token t + 1 when trained), so token t is a
    completion token when labels[t - 1] is not ignored; a document's last label
    is always ignored, so nothing leaks across documents.
    """
    trained = labels != ignore_index
    return torch.cat([trained.new_zeros(1), trained[:-1]])


def _check_groups(groups, count: int) -> int:
    if not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError(f"groups: expected a non-empty list of lists of example indices, got {type(groups).__name__}")
    size = len(groups[0])
    for g, members in enumerate(groups):
        if not isinstance(members, (list, tuple)) or len(members) != size or size < 1:
            raise ValueError(f"groups[{g}]: expected {size} example indices (every group the same size), "
                             f"got {members!r}")
        for i in members:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < count:
                raise ValueError(f"groups[{g}]: index {i!r} is not an example index in [0, {count})")
    return size


class GroupedDataset(EpochBins):
    """A resumable source of micro-batches that keep each group whole.

    Every epoch the groups are shuffled (generator seeded by ``seed + epoch``),
    packed best-fit-decreasing by their total length into ``token_budget``
    bins, and the bins shuffled; ``state_dict()`` is (epoch, position).

    Args:
        examples: all documents.
        groups: lists of example indices, all of one size K (e.g. [chosen, rejected]).
        token_budget: tokens per micro-batch; every group must fit.
        seed, shuffle: as in ``PackedDataset``.
        extras: optional, one dict of per-sequence scalars per example (stacked per batch).
    """

    _count_key = "num_groups"

    def __init__(self, examples: List[Example], groups: Sequence[Sequence[int]], token_budget: int, *,
                 seed: int, shuffle: bool = True, extras: Optional[List[dict]] = None):
        self.group_size = _check_groups(groups, len(examples))
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
            raise ValueError(f"token_budget: expected an int >= 1, got {token_budget!r}")
        self.examples = list(examples)
        self.groups = [list(g) for g in groups]
        self.lengths = [sum(len(self.examples[i]) for i in g) for g in self.groups]
        longest = max(self.lengths)
        if longest > token_budget:
            raise ValueError(f"token_budget: {token_budget} is smaller than the longest group of "
                             f"{self.group_size} completions ({longest} tokens); a group is never split, so raise "
                             f"data.token_budget or lower data.max_len")
        self.token_budget = token_budget
        self.seed, self.shuffle = int(seed), bool(shuffle)
        completion = [{"completion_len": float(max(e.num_trained, 1))} for e in self.examples]
        self.extras = [{**c, **(extras[i] if extras else {})} for i, c in enumerate(completion)]
        self._unit_lengths = self.lengths  # EpochBins packs whole groups
        self._start_epochs()

    def _bin_batch(self, members: List[int]) -> PackedBatch:
        return self.batch(members)

    def batch(self, group_ids: Sequence[int]) -> PackedBatch:
        """One micro-batch of these groups, with ``extras["ranking"]`` and ``extras["group_index"]``."""
        members = [i for g in group_ids for i in self.groups[g]]
        batch = build_batch(self.examples, members, extras=self.extras)
        k = self.group_size
        batch.extras["ranking"] = torch.arange(len(group_ids) * k, dtype=torch.int64).view(len(group_ids), k)
        batch.extras["group_index"] = torch.tensor(list(group_ids), dtype=torch.int64)
        batch.extras["completion_len"] = batch.extras["completion_len"].to(torch.float32)
        batch.num_groups = len(group_ids)
        return batch

    def all_batches(self, limit: int = 0) -> List[PackedBatch]:
        """Every group once, in packing order (evaluation); ``limit`` > 0 keeps the first ``limit`` batches."""
        bins = pack_by_budget(self.lengths, self.token_budget)
        return [self.batch(b) for b in (bins[:limit] if limit else bins)]


def tokenize_groups(records: List[dict], tokenizer, *, max_len: int, overlong: str = "truncate"):
    """Preference / ranked records -> (examples, groups, kept): kept[g] is the record index of group g.

    A ``prompt``/``chosen``/``rejected`` record gives the group [chosen, rejected];
    a ``prompt``/``completions`` record (completions best first) gives a group of
    all of them. Only completion tokens are trained. A group any of whose members
    the overlong policy drops is dropped whole.
    """
    from fusedrl.data.records import tokenize_sft

    examples: List[Example] = []
    groups: List[List[int]] = []
    kept: List[int] = []
    for r, record in enumerate(records):
        if not isinstance(record, dict) or "prompt" not in record:
            raise DataError(f"records[{r}]: expected a dict with 'prompt' and 'chosen'/'rejected' or "
                             f"'completions', got {record!r:.80}")
        if "completions" in record:
            completions = record["completions"]
            if not isinstance(completions, list) or len(completions) < 2:
                raise DataError(f"records[{r}]['completions']: expected a list of >= 2 completions, best first, "
                                 f"got {completions!r:.80}")
        elif "chosen" in record and "rejected" in record:
            completions = [record["chosen"], record["rejected"]]
        else:
            raise DataError(f"records[{r}]: expected 'chosen' and 'rejected', or 'completions'; "
                             f"got keys {sorted(record)}")
        members = []
        for completion in completions:
            example = tokenize_sft({"prompt": record["prompt"], "completion": completion}, tokenizer,
                                   max_len=max_len, overlong=overlong, train_on="last_assistant")
            if example is None:
                break
            members.append(example)
        if len(members) < len(completions):
            continue
        groups.append(list(range(len(examples), len(examples) + len(members))))
        kept.append(r)
        examples.extend(members)
    return examples, groups, kept
