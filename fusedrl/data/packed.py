"""Packing tokenized examples into token-budget micro-batches, and a resumable source of them.

``pack_examples`` bins examples with ``fusedrl.packing.pack_by_budget`` (best-fit
decreasing, C++ core when built) and lays each bin out as one ``PackedBatch``:

    input_ids    [a0 a1 a2 | b0 b1 | c0 c1 c2 c3]
    labels       [l(a1) l(a2) -100 | l(b1) -100 | l(c1) l(c2) l(c3) -100]   shifted inside each document
    position_ids [0 1 2 | 0 1 | 0 1 2 3]
    cu_seqlens   [0, 3, 5, 9]                                              int32

where ``l(x)`` is the example's (unshifted) label of token x: the token itself
if trained, -100 if not. ``num_tokens`` counts the non-ignored labels on the host.

These names are re-exported by ``fusedrl.data.records``; import them from there.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from fusedrl.data.batch import IGNORE_INDEX, PackedBatch
from fusedrl.packing import cu_seqlens_and_positions, pack_by_budget


@dataclass
class Example:
    """One tokenized document.

    input_ids: token ids of the whole rendered document.
    labels:    same length; ``labels[t] = input_ids[t]`` where token t is a
               training target, -100 elsewhere. NOT shifted: packing shifts.
    """

    input_ids: List[int]
    labels: List[int]

    def __post_init__(self):
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"labels: expected the length of input_ids ({len(self.input_ids)}), got {len(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        """Targets left after shifting (a document's first token is never a target)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def pack_examples(examples: List[Example], token_budget: int, *, extras: Optional[List[dict]] = None,
                  token_keys: Sequence[str] = ()) -> List[PackedBatch]:
    """Pack examples into micro-batches of at most ``token_budget`` tokens.

    Args:
        examples: the documents; each must be at most ``token_budget`` long
            (drop or truncate before packing: see ``tokenize_sft``'s ``overlong``).
        token_budget: tokens per micro-batch.
        extras: optional, one dict per example with the same keys. A value is
            a scalar or tensor per sequence, stacked in bin order into
            ``batch.extras[key]`` of shape ``(num_seqs, ...)``; for keys in
            ``token_keys`` it is one value per token of the example (list or
            1-D tensor, aligned with ``input_ids``), shifted like the labels
            (the value of token t+1 at position t, 0 at a document's last
            token) and concatenated to ``(total,)``.
        token_keys: the per-token keys of ``extras``.

    Returns:
        The batches in bin order. Each has ``extras["example_index"]`` (num_seqs,)
        int64: which examples it holds, in order.
    """
    _check_examples(examples)
    if extras is not None:
        _check_extras(extras, len(examples), token_keys)
    bins = pack_by_budget([len(e) for e in examples], token_budget)
    return [build_batch(examples, members, extras=extras, token_keys=token_keys) for members in bins]


def build_batch(examples: List[Example], members: Sequence[int], *, extras: Optional[List[dict]] = None,
                token_keys: Sequence[str] = ()) -> PackedBatch:
    """One ``PackedBatch`` of ``examples[i] for i in members``, in that order (see ``pack_examples``)."""
    input_ids: List[int] = []
    labels: List[int] = []
    lengths = []
    for i in members:
        example = examples[i]
        input_ids.extend(example.input_ids)
        labels.extend(example.labels[1:])
        labels.append(IGNORE_INDEX)  # a document's last token predicts nothing
        lengths.append(len(example))
    cu_seqlens, position_ids = cu_seqlens_and_positions(lengths)
    num_tokens = sum(1 for label in labels if label != IGNORE_INDEX)
    batch_extras: Dict[str, torch.Tensor] = {"example_index": torch.tensor(list(members), dtype=torch.int64)}
    for key in (extras[0] if extras else {}):
        values = [extras[i][key] for i in members]
        if key in token_keys:
            shifted = []
            for value in values:
                value = torch.as_tensor(value)
                shifted.append(torch.cat([value[1:], value.new_zeros(1)]))
            batch_extras[key] = torch.cat(shifted)
        else:
            batch_extras[key] = torch.stack([torch.as_tensor(v) for v in values])
    return PackedBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        num_tokens=num_tokens,
        extras=batch_extras,
    )


def _check_examples(examples) -> None:
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError(f"examples: expected a non-empty list of Example, got {type(examples).__name__} "
                         f"of length {len(examples) if hasattr(examples, '__len__') else '?'}")
    for i, example in enumerate(examples):
        if not isinstance(example, Example):
            raise TypeError(f"examples[{i}]: expected an Example, got {type(example).__name__}")
        if len(example) == 0:
            raise ValueError(f"examples[{i}]: empty example (no tokens)")


def _check_extras(extras, count: int, token_keys: Sequence[str]) -> None:
    if not isinstance(extras, (list, tuple)) or len(extras) != count:
        raise ValueError(f"extras: expected a list of {count} dicts (one per example), got "
                         f"{type(extras).__name__} of length {len(extras) if hasattr(extras, '__len__') else '?'}")
    keys = set(extras[0]) if isinstance(extras[0], dict) else None
    if keys is not None and "example_index" in keys:
        raise ValueError("extras: the key 'example_index' is reserved (packing writes it)")
    for i, extra in enumerate(extras):
        if not isinstance(extra, dict) or set(extra) != keys:
            raise ValueError(f"extras[{i}]: expected a dict with keys {sorted(keys or [])}, got {extra!r:.80}")
    missing = [k for k in token_keys if keys is None or k not in keys]
    if missing:
        raise ValueError(f"token_keys: {missing} are not keys of extras")


class EpochBins:
    """Resumable epochs of packed bins, shared by ``PackedDataset`` and ``GroupedDataset``.

    The units (examples, or whole groups) of lengths ``self._unit_lengths`` are shuffled
    every epoch with a generator seeded by ``seed + epoch`` (never the global RNG), packed
    best-fit-decreasing into ``token_budget`` bins, and the bins shuffled. A subclass sets
    ``seed``, ``shuffle``, ``token_budget`` and ``_unit_lengths``, calls ``_start_epochs()``,
    names its unit count in ``_count_key`` and builds one batch from a bin in ``_bin_batch``.
    """

    _count_key = "num_units"

    def _start_epochs(self) -> None:
        self._epoch, self._position = 0, 0
        self._bins = self._epoch_bins(0)  # validates the budget against every length

    def _bin_batch(self, members: List[int]) -> PackedBatch:
        raise NotImplementedError(f"{type(self).__name__} must implement _bin_batch(members)")

    @property
    def epoch(self) -> int:
        """Epochs completed before the next batch (0-based index of the current epoch)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Index of the next batch within the current epoch."""
        return self._position

    def __len__(self) -> int:
        """Batches per epoch (the same every epoch: best-fit decreasing sees the same sorted lengths)."""
        return len(self._bins)

    def _epoch_bins(self, epoch: int) -> List[List[int]]:
        if not self.shuffle:
            return pack_by_budget(self._unit_lengths, self.token_budget)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self._unit_lengths), generator=generator).tolist()
        bins = pack_by_budget([self._unit_lengths[i] for i in order], self.token_budget)
        bin_order = torch.randperm(len(bins), generator=generator).tolist()
        return [[order[j] for j in bins[b]] for b in bin_order]

    def next_batches(self, n: int) -> List[PackedBatch]:
        """The next ``n`` micro-batches, continuing into the next epoch when one ends."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n: expected an int >= 1, got {n!r}")
        batches = []
        for _ in range(n):
            if self._position == len(self._bins):
                self._epoch += 1
                self._position = 0
                self._bins = self._epoch_bins(self._epoch)
            members = self._bins[self._position]
            self._position += 1
            batches.append(self._bin_batch(members))
        return batches

    def state_dict(self) -> dict:
        """Where the dataset is: {"epoch", "position"} plus what must match on resume."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                self._count_key: len(self._unit_lengths), "token_budget": self.token_budget}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``; the seed, unit count and budget must match."""
        for key in ("seed", self._count_key, "token_budget"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(f"state['{key}']: the checkpoint has {state[key]!r}, this dataset has "
                                 f"{self.state_dict()[key]!r}; resume with the same data and settings")
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(position, int) or position < 0:
            raise ValueError(f"state: expected int 'epoch' >= 0 and 'position' >= 0, got {epoch!r}, {position!r}")
        bins = self._epoch_bins(epoch)
        if position > len(bins):
            raise ValueError(f"state['position']: {position} is past the {len(bins)} batches of an epoch")
        self._epoch, self._position, self._bins = epoch, position, bins


class PackedDataset(EpochBins):
    """An ordered, resumable source of packed micro-batches over epochs.

    Every epoch, examples are shuffled with a generator seeded by ``seed + epoch``
    (never the global RNG), packed best-fit-decreasing into ``token_budget``
    bins, and the bins are shuffled; batches are built lazily as they are
    asked for. ``state_dict()`` is (epoch, position), so a run resumed from it
    sees exactly the batches an uninterrupted run would have seen.

    Args:
        examples: the documents (each at most ``token_budget`` tokens).
        token_budget: tokens per micro-batch.
        seed: shuffling seed.
        shuffle: shuffle examples and batch order each epoch; if False, every
            epoch yields the same batches in packing order.
        extras, token_keys: per-example extras, as in ``pack_examples``.
    """

    _count_key = "num_examples"

    def __init__(self, examples: List[Example], token_budget: int, *, seed: int, shuffle: bool = True,
                 extras: Optional[List[dict]] = None, token_keys: Sequence[str] = ()):
        _check_examples(examples)
        if extras is not None:
            _check_extras(extras, len(examples), token_keys)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.examples = list(examples)
        self.token_budget = token_budget
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.extras = extras
        self.token_keys = tuple(token_keys)
        self._unit_lengths = [len(e) for e in self.examples]
        self._start_epochs()

    def _bin_batch(self, members: List[int]) -> PackedBatch:
        return build_batch(self.examples, members, extras=self.extras, token_keys=self.token_keys)
