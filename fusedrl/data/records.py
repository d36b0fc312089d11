"""Training data: loading records, recognising their format, tokenizing with prompt masking.

Formats (one record = one JSON object / Parquet row; see docs/engine_data_model.md):

    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    prompt_completion  {"prompt": ..., "completion": ...}
    preference         {"prompt": ..., "chosen": ..., "rejected": ...}
    unpaired           {"prompt": ..., "completion": ..., "label": true}
    prompt             {"prompt": ..., "answer": ...}          (answer optional; for RL)

``prompt`` may be a string (one user turn) or a list of messages; ``completion``,
``chosen`` and ``rejected`` a string (one assistant turn) or a list of messages.
Everything is rendered with ``tokenizer.apply_chat_template``. An ``Example``
holds unshifted labels (``labels[t] = input_ids[t]`` where token t is trained,
-100 elsewhere); packing (``pack_examples`` / ``PackedDataset``,
implemented in ``fusedrl.data.packed``) shifts them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fusedrl.data.batch import IGNORE_INDEX
from fusedrl.data.packed import Example, PackedDataset, pack_examples
from fusedrl.data.sources import data_options, map_columns, read_dataset
from fusedrl.data.validate import DataError, bad_record_policy, screen_records

__all__ = [
    "DataError", "Example", "PackedDataset", "detect_format", "load_records", "pack_examples",
    "tokenize_prompt", "tokenize_records", "tokenize_sft", "validate_record",
]

logger = logging.getLogger(__name__)

FORMATS = ("messages", "prompt_completion", "preference", "unpaired", "prompt")
TRAIN_ON = ("all_assistant", "last_assistant")
OVERLONG = ("truncate", "drop")


# ----------------------------------------------------------------------------- loading

def load_records(source: str, *, split: Optional[str] = None, on_bad: Optional[str] = None,
                 columns: Optional[Dict[str, str]] = None) -> List[dict]:
    """Load and validate records from a file or a Hugging Face dataset.

    Args:
        source: a ``.jsonl`` / ``.json`` file (one object per line, or one JSON
            array), a ``.parquet`` file, or a Hugging Face ``datasets`` source: a
            ``save_to_disk`` folder, a local dataset folder or script, or ``hf:org/name``,
            each optionally ending with ``:SPLIT`` (see ``fusedrl.data.sources``).
        split: dataset split when the source has no ``:SPLIT`` (default: the run's
            data.split / data.eval_split for its data.train / data.eval, else ``"train"``);
            ignored for files.
        on_bad: a record whose content is unusable (empty text, chosen == rejected, a bad label
            or margin, an unknown role, too long: ``fusedrl.data.validate``) raises ("error") or is
            dropped and counted ("drop"); default: the run's ``data.on_bad_record``.
        columns: record field -> the source's column holding it, applied before validation
            (default: the run's ``data.columns``).

    Returns:
        The records as dicts, all of one format (see ``detect_format``).

    Raises:
        ValueError: a record that is not valid JSON, not an object, or not in a
            known format; the message names the file and the line (1-based) or
            Parquet/array row (0-based) and what is wrong; a mapped column the source lacks.
        FileNotFoundError: a file path that does not exist.
        DataError: a dataset source when ``datasets`` (the ``data`` extra) is not installed.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected a path or dataset name (str), got {type(source).__name__}")
    path = os.fspath(source)
    options = data_options()
    suffix = os.path.splitext(path)[1].lower()
    names = None
    if suffix in (".jsonl", ".json"):
        located = _read_json_records(path)
    elif suffix == ".parquet":
        located = _read_parquet_records(path)
    else:
        located, names = read_dataset(path, split=split or options.split_for(path))
    located = map_columns(located, options.columns if columns is None else columns, path, names)
    first_format, typed = None, []
    for where, record in located:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        try:
            fmt = validate_record(record)
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        if first_format is None:
            first_format = fmt
        elif fmt != first_format:
            raise DataError(f"{where}: record is in format {fmt!r} but earlier records are {first_format!r}")
        typed.append((where, record, fmt))
    return screen_records(typed, on_bad=on_bad or bad_record_policy(), source=path)


def _read_json_records(path: str) -> List[Tuple[str, Any]]:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x}); save the file as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
    located = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            located.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    return located


def _read_parquet_records(path: str) -> List[Tuple[str, Any]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)]


# ----------------------------------------------------------------------------- formats

def detect_format(record: dict) -> str:
    """The record's format from its keys.

    Returns one of ``"messages"``, ``"prompt_completion"``, ``"preference"``,
    ``"unpaired"``, ``"prompt"``. Raises ValueError when the keys fit none.
    """
    if not isinstance(record, dict):
        raise TypeError(f"record: expected a dict, got {type(record).__name__}")
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "prompt" in keys:
        if {"chosen", "rejected"} <= keys:
            return "preference"
        if "completion" in keys:
            return "unpaired" if "label" in keys else "prompt_completion"
        if keys & {"chosen", "rejected"}:
            raise DataError(f"record: a preference record needs both 'chosen' and 'rejected', got keys {sorted(keys)}")
        return "prompt"
    raise DataError(
        f"record: unknown format, keys {sorted(keys)}; expected 'messages', 'prompt'+'completion', "
        "'prompt'+'chosen'+'rejected', 'prompt'+'completion'+'label', or 'prompt' (+'answer')"
    )


def validate_record(record: dict) -> str:
    """Check the record's fields have the right types; returns its format (ValueError if not)."""
    fmt = detect_format(record)
    if fmt == "messages":
        _check_messages(record["messages"], "messages")
        return fmt
    _check_turns(record["prompt"], "prompt")
    for key in {"prompt_completion": ["completion"], "unpaired": ["completion"],
                "preference": ["chosen", "rejected"]}.get(fmt, []):
        _check_turns(record[key], key)
    if fmt == "unpaired" and not isinstance(record["label"], (bool, int)):
        raise DataError(f"label: expected a bool, got {type(record['label']).__name__}")
    return fmt


def _check_turns(value: Any, name: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list):
        _check_messages(value, name)
        return
    raise DataError(f"{name}: expected a string or a list of messages, got {type(value).__name__}")


def _check_messages(messages: Any, name: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{name}: expected a non-empty list of messages, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{name}[{i}]: expected {{'role': str, 'content': str}}, got {message!r:.80}")


def _as_messages(value: Any, role: str) -> List[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


# ----------------------------------------------------------------------------- tokenizing

def tokenize_sft(record: dict, tokenizer, *, max_len: int, train_on: str = "all_assistant",
                 overlong: str = "truncate") -> Optional[Example]:
    """Render and tokenize a ``messages`` / ``prompt_completion`` / ``unpaired`` record for SFT.

    Args:
        record: the record; prompt/completion records become a user + assistant chat.
        tokenizer: a Hugging Face tokenizer with a chat template.
        max_len: the longest kept example in tokens.
        train_on: ``"all_assistant"`` trains every assistant turn, ``"last_assistant"``
            only the last one; everything else (system, user, role markers) is masked.
        overlong: ``"truncate"`` keeps the first ``max_len`` tokens, ``"drop"`` drops
            the example.

    Returns:
        An ``Example``, or ``None`` when the policy drops it (too long under
        ``"drop"``, or no trained token left after truncation); the caller counts these.
    """
    _check_choice(train_on, "train_on", TRAIN_ON)
    fmt = validate_record(record)
    if fmt == "messages":
        messages = list(record["messages"])
    elif fmt in ("prompt_completion", "unpaired"):
        messages = _as_messages(record["prompt"], "user") + _as_messages(record["completion"], "assistant")
    else:
        raise DataError(f"record: tokenize_sft needs a messages or prompt/completion record, got format {fmt!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("messages: no assistant turn to train on")
    train_from = 0
    if train_on == "last_assistant":
        train_from = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    example = _chat_example(messages, tokenizer, train_from)
    return _apply_overlong(example, max_len, overlong)


def tokenize_prompt(record: dict, tokenizer) -> List[int]:
    """The chat prompt of a record, ending with the generation prompt, for sampling.

    ``prompt`` records (and the prompt of any other format) are used as is; a
    ``messages`` record loses its trailing assistant turns.
    """
    fmt = validate_record(record)
    if fmt == "messages":
        messages = list(record["messages"])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise DataError("messages: no turn left before the assistant's to use as a prompt")
    else:
        messages = _as_messages(record["prompt"], "user")
    return _render(tokenizer, messages, add_generation_prompt=True)["input_ids"]


# Renderings by tokenizer, keyed by (chat template, messages as JSON, flags): RL stages and the
# scoring loops render the same prompts again and again (a group of G samples shares its prompt,
# every evaluation renders the held-out prompts), and a Jinja render costs ~0.5 ms.
_RENDER_CACHE: "weakref.WeakKeyDictionary[Any, Dict[tuple, dict]]" = weakref.WeakKeyDictionary()
_RENDER_CACHE_SIZE = 1 << 16  # renderings kept per tokenizer; the cache is emptied when full


def _render(tokenizer, messages: List[dict], *, add_generation_prompt: bool = False,
            assistant_mask: bool = False) -> dict:
    try:
        key = (repr(getattr(tokenizer, "chat_template", None)), json.dumps(messages, sort_keys=True),
               add_generation_prompt, assistant_mask)
        cache = _RENDER_CACHE.setdefault(tokenizer, {})
    except TypeError:  # messages that are not JSON, or a tokenizer that cannot be weakly referenced
        key, cache = None, None
    if cache is not None and key in cache:
        return {k: list(v) for k, v in cache[key].items()}
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=assistant_mask,
    )
    out = {k: list(v) for k, v in out.items()}
    if cache is not None:
        if len(cache) >= _RENDER_CACHE_SIZE:
            cache.clear()
        cache[key] = {k: list(v) for k, v in out.items()}
    return out


_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def _chat_example(messages: List[dict], tokenizer, train_from: int) -> Example:
    """Tokenize ``messages``, training the assistant turns at index >= ``train_from``."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("tokenizer: has no chat_template; set one (see fusedrl.data.tokenizer)")
    if isinstance(template, str) and _GENERATION_TAG.search(template):
        full = _render(tokenizer, messages, assistant_mask=True)
        ids, mask = full["input_ids"], full["assistant_masks"]
        start = 0
        if train_from > 0:
            start = _prefix_len(tokenizer, messages[:train_from], ids)
        labels = [tok if m and t >= start else IGNORE_INDEX for t, (tok, m) in enumerate(zip(ids, mask))]
        return Example(ids, labels)
    # Templates without {% generation %}: find each trained assistant turn as the
    # difference between the rendering up to it (with generation prompt) and through it.
    ids = _render(tokenizer, messages)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for i in range(train_from, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        start = _prefix_len(tokenizer, messages[:i], ids)
        end = _prefix_len(tokenizer, messages[: i + 1], ids, generation_prompt=False)
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _prefix_len(tokenizer, prefix: List[dict], ids: List[int], *, generation_prompt: bool = True) -> int:
    head = _render(tokenizer, prefix, add_generation_prompt=generation_prompt)["input_ids"]
    if ids[: len(head)] != head:
        raise ValueError(
            "tokenizer: the chat template does not render a conversation's prefix as a prefix of the "
            "whole conversation, so prompt masking is ambiguous; add {% generation %} tags to it"
        )
    return len(head)


# Examples cut or dropped by the overlong policy since the process started (by reason);
# `run_training` logs the counts of its run (see `overlong_counts`).
_OVERLONG_COUNTS = {"truncated": 0, "dropped_overlong": 0, "dropped_untrained": 0}


def overlong_counts() -> dict:
    """A copy of the running counts of truncated / dropped examples (subtract two to get a run's)."""
    return dict(_OVERLONG_COUNTS)


def _apply_overlong(example: Example, max_len: int, overlong: str) -> Optional[Example]:
    _check_choice(overlong, "overlong", OVERLONG)
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len: expected an int >= 2, got {max_len!r}")
    if len(example) > max_len:
        if overlong == "drop":
            _OVERLONG_COUNTS["dropped_overlong"] += 1
            return None
        _OVERLONG_COUNTS["truncated"] += 1
        example = Example(example.input_ids[:max_len], example.labels[:max_len])
    if example.num_trained == 0:
        _OVERLONG_COUNTS["dropped_untrained"] += 1
        return None
    return example


def _check_choice(value: str, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def tokenize_records(records: List[dict], tokenizer, *, max_len: int, train_on: str = "all_assistant",
                     overlong: str = "truncate") -> Tuple[List[Example], int]:
    """``tokenize_sft`` over records; returns (examples, number dropped) and logs the drops."""
    examples, dropped = [], 0
    for i, record in enumerate(records):
        try:
            example = tokenize_sft(record, tokenizer, max_len=max_len, train_on=train_on, overlong=overlong)
        except ValueError as err:
            raise DataError(f"records[{i}]: {err}") from None
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if dropped:
        logger.warning("dropped %d of %d examples (overlong=%r, max_len=%d)", dropped, len(records), overlong, max_len)
    return examples, dropped
