"""Process-reward data: PRM800K-style records with one label per reasoning step.

A record is

    {"prompt": "what is 2 + 3 * 4?", "steps": ["3 * 4 = 12", "2 + 12 = 14"], "labels": [1, 1]}

with labels in {-1, 0, 1} (bad, neutral, good; PRM800K) or {0, 1} (bad, good). The solution is
rendered as the assistant turn `step_1 + sep + step_2 + sep + ... + step_K + sep` (`sep`, the
step separator, is configurable, "\\n" by default) followed by the end-of-turn token; each step
is tokenized on its own (with its separator), so step boundaries are exact token boundaries.
Step k ends at the last token of `step_k + sep`: the one position whose label is trained.

In the packed batch (`PackedBatch.labels` is shifted: labels[t] belongs to token t + 1) the
example stores the class id of step k at index end_k + 1, so `batch.labels[t]` is the class id
at step-end token t and IGNORE_INDEX elsewhere: `batch.labels != IGNORE_INDEX` is the step mask
and `batch.num_tokens` the number of steps.

Class ids (`step_class`): 3 classes: -1 -> 0, 0 -> 1, 1 -> 2; 2 classes or a scalar head:
-1 / 0 (bad) -> 0, 1 -> 1, and the PRM800K neutral 0 -> `neutral_as` when the data is signed.
The good class is always the last one (C - 1; 1 for the scalar head).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from fusedrl.data.batch import IGNORE_INDEX
from fusedrl.data.packed import Example

LABEL_VALUES = (-1, 0, 1)


def check_prm_record(record, index: int) -> None:
    """ValueError naming the record and field when it is not a prompt/steps/labels record."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f"records[{index}]: expected a dict with a 'prompt' string, 'steps' and 'labels', "
                         f"got {record!r:.80}")
    steps, labels = record.get("steps"), record.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
        raise ValueError(f"records[{index}]['steps']: expected a non-empty list of non-empty strings, got {steps!r:.80}")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise ValueError(f"records[{index}]['labels']: expected a list of {len(steps)} labels (one per step), "
                         f"got {labels!r:.80}")
    for label in labels:
        if isinstance(label, bool) or label not in LABEL_VALUES:
            raise ValueError(f"records[{index}]['labels']: expected values in {{-1, 0, 1}} or {{0, 1}}, got {label!r}")


def is_signed(records: Sequence[dict]) -> bool:
    """True when the labels use PRM800K's {-1, 0, 1} convention (some label is -1), False for {0, 1}."""
    return any(label == -1 for r in records for label in r["labels"])


def step_class(label: int, *, signed: bool, num_classes: int, neutral_as: int = 1) -> int:
    """The class id of one raw step label (see the module docstring)."""
    if num_classes == 3:
        if not signed:
            raise ValueError("num_classes: 3 classes need {-1, 0, 1} labels (bad, neutral, good); these are {0, 1}")
        return label + 1
    if signed and label == 0:
        return neutral_as
    return 1 if label == 1 else 0


def step_segments(tokenizer, steps: Sequence[str], separator: str) -> List[List[int]]:
    """Token ids of each `step + separator`, tokenized on its own (no special tokens)."""
    return [tokenizer.encode(step + separator, add_special_tokens=False) for step in steps]


def tokenize_prm(record: dict, tokenizer, *, separator: str = "\n", max_len: int, signed: bool,
                 num_classes: int = 2, neutral_as: int = 1) -> Tuple[Optional[Example], List[int]]:
    """(Example with class ids at step ends as described above, or None when no step fits; step-end positions).

    Steps cut by max_len lose their label; a record with no complete step left gives (None, []).
    """
    from fusedrl.data.records import tokenize_prompt

    ids = list(tokenize_prompt({"prompt": record["prompt"]}, tokenizer))
    targets, ends = [], []
    for segment, label in zip(step_segments(tokenizer, record["steps"], separator), record["labels"]):
        ids.extend(segment)
        ends.append(len(ids) - 1)
        targets.append(step_class(label, signed=signed, num_classes=num_classes, neutral_as=neutral_as))
    ids.append(tokenizer.eos_token_id)
    ids = ids[:max_len]
    labels = [IGNORE_INDEX] * len(ids)
    kept = [(e, t) for e, t in zip(ends, targets) if e + 1 < len(ids)]
    for end, target in kept:
        labels[end + 1] = target
    if not kept:
        return None, []
    return Example(ids, labels), [e for e, _ in kept]


def prm_examples(records: Sequence[dict], tokenizer, *, separator: str, max_len: int, num_classes: int,
                 neutral_as: int = 1, signed: Optional[bool] = None) -> Tuple[List[Example], int]:
    """Validate and tokenize records; (examples, records dropped because no step fit in max_len)."""
    for i, record in enumerate(records):
        check_prm_record(record, i)
    signed = is_signed(records) if signed is None else signed
    examples, dropped = [], 0
    for record in records:
        example, _ = tokenize_prm(record, tokenizer, separator=separator, max_len=max_len, signed=signed,
                                  num_classes=num_classes, neutral_as=neutral_as)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped
