"""Checks of a run's inputs before anything is built, and of each record's content at load.

    check_data_paths(cfg)                     # data.train / data.eval / model.name_or_path exist
    check_record_content(record, fmt)         # ValueError naming the field; None when fine
    kept = screen_records(located, on_bad="error" | "drop")

A record is rejected (with its file:line) or, with on_bad="drop", dropped and counted, when:

- prompt, completion, chosen or rejected is an empty string (or a message has empty content);
- chosen == rejected (a preference pair that prefers nothing);
- an unpaired (KTO) label is not one of true, false, 0, 1;
- a margin (preference records may carry one) is not a finite number;
- a message's role is not one of system, user, assistant, tool;
- a record's text is longer than MAX_RECORD_CHARS characters (checked before tokenisation:
  a 20 MB record would otherwise be tokenised whole only to be truncated).

Data files hold data only: no field of a record names code (a verifier or a module), and
nothing in a record is ever imported or evaluated.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from typing import Any, Iterable, List, Optional, Tuple


class DataError(ValueError):
    """Bad training data: a missing or unreadable file, a malformed record, a record of the wrong format.

    The CLI prints it as one line (exit 2), like a ConfigError.
    """


logger = logging.getLogger("fusedrl")

ROLES = ("system", "user", "assistant", "tool")
ON_BAD = ("error", "drop")
MAX_RECORD_CHARS = 1_000_000
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected")


# ----------------------------------------------------------------------------- paths

def _looks_like_a_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text


def check_data_file(value: Optional[str], key: str, *, required: bool) -> None:
    """ValueError naming `key` when the data source is missing, empty or of an unknown type.

    A source is a .jsonl/.json/.parquet file or a Hugging Face dataset source (a save_to_disk or dataset
    folder, a dataset script, hf:org/name; see fusedrl.data.sources), the latter only with `datasets`.
    """
    if value is None or value == "":
        if required:
            raise DataError(f"{key}: no training data given; set it to a .jsonl/.json/.parquet file or a dataset")
        return
    suffix = os.path.splitext(value)[1].lower()
    if suffix in FILE_SUFFIXES and not value.startswith("hf:"):
        if not os.path.isfile(value):
            raise DataError(f"{key}: file {value!r} does not exist (relative paths are from {os.getcwd()})")
        return
    from fusedrl.data.sources import INSTALL_HINT, parse_source
    try:
        kind, _, _ = parse_source(value)
    except ValueError as err:
        raise DataError(f"{key}: {str(err).partition(': ')[2]}") from None
    if kind == "missing":
        raise DataError(f"{key}: {value!r} is not a file or a folder: it does not exist (relative paths are from "
                        f"{os.getcwd()}); expected a .jsonl/.json/.parquet file, a dataset folder or script, or "
                        "hf:org/name")
    if kind == "unsupported":
        raise DataError(f"{key}: {value!r} has no .jsonl/.json/.parquet suffix and is not a dataset folder or "
                        "script; rename it to one")
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"{key}: {value!r} is a Hugging Face dataset source, which needs the optional extra: "
                        f"{INSTALL_HINT}")


def check_model_path(value: Optional[str], key: str = "model.name_or_path") -> None:
    """ValueError when a local model path (./x, /x, a/b/c) does not exist (hub ids are left to the hub)."""
    if value and _looks_like_a_path(value) and not os.path.exists(os.path.expanduser(value)):
        raise DataError(f"{key}: model folder {value!r} does not exist")


def _first_format(path: str) -> Optional[str]:
    """The format of the first record of a .jsonl file (None: not a readable .jsonl record)."""
    import json

    from fusedrl.data.records import detect_format
    if not path.lower().endswith(".jsonl") or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    return detect_format(json.loads(line))
    except (ValueError, TypeError, UnicodeDecodeError):
        return None  # reported with its line when the file is loaded
    return None


def check_data_paths(cfg: Any) -> None:
    """The run's data files and model path, checked before the model is built."""
    check_data_file(cfg.data.train, "data.train", required=True)
    check_data_file(cfg.data.eval, "data.eval", required=False)
    check_model_path(cfg.model.name_or_path)
    if cfg.data.eval:
        train, held_out = _first_format(cfg.data.train), _first_format(cfg.data.eval)
        if train and held_out and train != held_out:
            raise DataError(f"data.eval: the eval file {cfg.data.eval!r} holds {held_out!r} records, but "
                             f"data.train holds {train!r} records; give an eval file of the same format")


# ----------------------------------------------------------------------------- records

def _check_text(value: Any, name: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{name}: is empty")
        return
    if isinstance(value, list):
        for i, message in enumerate(value):
            if isinstance(message, dict):
                role = message.get("role")
                if isinstance(role, str) and role not in ROLES:
                    raise DataError(f"{name}[{i}].role: unknown chat role {role!r}; expected one of {ROLES}")
                content = message.get("content")
                if isinstance(content, str) and not content.strip() and role != "system":
                    raise DataError(f"{name}[{i}].content: is empty")


def _length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(m.get("content", "")) for m in value if isinstance(m, dict)
                   and isinstance(m.get("content"), str))
    return 0


def check_record_content(record: dict, fmt: str, *, max_chars: int = MAX_RECORD_CHARS) -> None:
    """ValueError naming the field when a (well-typed) record's content is unusable; see the module doc."""
    total = 0
    if fmt == "messages":
        _check_text(record["messages"], "messages")
        total = _length(record["messages"])
    for name in _TEXT_FIELDS:
        if name in record:
            _check_text(record[name], name)
            total += _length(record[name])
    if total > max_chars:
        raise DataError(f"record: {total} characters, more than the {max_chars} a record may have")
    if fmt == "preference" and record["chosen"] == record["rejected"]:
        raise DataError("chosen: equals rejected (the pair prefers nothing)")
    if fmt == "unpaired":
        label = record["label"]
        if not isinstance(label, bool) and label not in (0, 1):
            raise DataError(f"label: expected true, false, 0 or 1, got {label!r}")
    if "margin" in record:
        margin = record["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise DataError(f"margin: expected a finite number, got {margin!r}")


def screen_records(located: Iterable[Tuple[str, dict, str]], *, on_bad: str = "error",
                   source: str = "") -> List[dict]:
    """Records whose content passes `check_record_content`; the others raise or are dropped and counted.

    Args:
        located: (where, record, format) triples; `where` is "file:line" or "file row N".
        on_bad: "error" raises ValueError("where: field: what") at the first bad record;
            "drop" drops every bad one and logs how many (and the first reason).
    """
    if on_bad not in ON_BAD:
        raise DataError(f"data.on_bad_record: expected one of {ON_BAD}, got {on_bad!r}")
    kept, dropped, first = [], 0, None
    for where, record, fmt in located:
        try:
            check_record_content(record, fmt)
            _check_prompt_length(record, fmt)
        except ValueError as err:
            if on_bad == "error":
                raise DataError(f"{where}: {err}") from None
            dropped, first = dropped + 1, first or f"{where}: {err}"
            continue
        kept.append(record)
    if dropped:
        logger.warning("%s: dropped %d of %d records (data.on_bad_record = \"drop\"); first: %s",
                       source or "data", dropped, dropped + len(kept), first)
    return kept


# ----------------------------------------------------------------------------- the run's policy

_PROMPT_LIMIT: list = [None]  # (tokenizer, limit in tokens, what the limit is) while a RL stage loads


def _check_prompt_length(record: dict, fmt: str) -> None:
    if _PROMPT_LIMIT[-1] is None or ("prompt" not in record and fmt != "messages"):
        return
    from fusedrl.data.records import tokenize_prompt
    tokenizer, limit, what = _PROMPT_LIMIT[-1]
    length = len(tokenize_prompt(record if fmt in ("prompt", "messages") else {"prompt": record["prompt"]},
                                 tokenizer))
    if length > limit:
        raise DataError(f"prompt: {length} tokens, more than {what} = {limit}")


class using_prompt_limit:
    """Context manager: records loaded inside must have prompts of at most `limit` tokens (RL stages:
    data.max_len - rollout.max_new_tokens, so prompt + completion fit data.max_len)."""

    def __init__(self, tokenizer, limit: Optional[int], what: str = "the prompt limit"):
        self.entry = None if limit is None else (tokenizer, limit, what)

    def __enter__(self):
        _PROMPT_LIMIT.append(self.entry)
        return self

    def __exit__(self, *exc):
        _PROMPT_LIMIT.pop()
        return False


def rl_prompt_limit(cfg: Any) -> Optional[int]:
    """data.max_len - rollout.max_new_tokens for configs with a [rollout] table, else None."""
    rollout = getattr(cfg, "rollout", None)
    if rollout is None or not isinstance(getattr(rollout, "max_new_tokens", None), int):
        return None
    limit = cfg.data.max_len - rollout.max_new_tokens
    if limit < 1:
        raise DataError(f"data.max_len ({cfg.data.max_len}) must exceed rollout.max_new_tokens "
                         f"({rollout.max_new_tokens}): a prompt and its completion must fit data.max_len")
    return limit


_POLICY = ["error"]


def bad_record_policy() -> str:
    """The policy `load_records` uses when not given one: the running run's data.on_bad_record."""
    return _POLICY[-1]


class using_bad_record_policy:
    """Context manager: `load_records` calls inside use `policy` ("error" or "drop")."""

    def __init__(self, policy: str):
        if policy not in ON_BAD:
            raise DataError(f"data.on_bad_record: expected one of {ON_BAD}, got {policy!r}")
        self.policy = policy

    def __enter__(self):
        _POLICY.append(self.policy)
        return self

    def __exit__(self, *exc):
        _POLICY.pop()
        return False
