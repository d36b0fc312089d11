"""Synthetic tasks with checkable answers, for the demo and the tests.

    records = make_records("reverse", 200, seed=0)   # [{"prompt": "reverse: abc", "completion": "cba", "answer": "cba"}]
    exact_match("reverse: abc", "cba", answer="cba")  # 1.0
    accuracy = score_model(model, tokenizer, records)  # greedy exact-match accuracy

Records are in the `prompt`/`completion` format (SFT) and carry the reference
`answer` (the RL `prompt` format), so one file serves every stage. A verifier
has the signature RL stages use: `fn(prompt, completion, **fields) -> float`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Sequence


from fusedrl.rollout.completions import greedy_texts
from fusedrl.rollout.rewards import exact_match  # the demo tasks' verifier

TASKS = ("reverse", "add")


@dataclass
class TaskConfig:
    kind: str = "reverse"
    """"reverse" (reverse a short lowercase word) or "add" (add two small numbers)."""
    train_size: int = 2000
    """Training examples."""
    eval_size: int = 64
    """Held-out prompts scored by greedy generation (disjoint from the training prompts)."""
    min_len: int = 2
    """reverse: shortest word; add: fewest digits per operand."""
    max_len: int = 5
    """reverse: longest word; add: most digits per operand."""
    alphabet: str = "abcdefghij"
    """reverse: letters words are drawn from."""
    seed: int = 0
    """Seed of the generated examples."""


def _example(kind: str, rng: random.Random, cfg: TaskConfig) -> Dict[str, str]:
    if kind == "reverse":
        word = "".join(rng.choice(cfg.alphabet) for _ in range(rng.randint(cfg.min_len, cfg.max_len)))
        return {"prompt": f"reverse: {word}", "completion": word[::-1], "answer": word[::-1]}
    if kind == "add":
        a, b = (rng.randint(0, 10 ** rng.randint(cfg.min_len, cfg.max_len) - 1) for _ in range(2))
        return {"prompt": f"add: {a}+{b}", "completion": str(a + b), "answer": str(a + b)}
    raise ValueError(f"task kind: expected one of {TASKS}, got {kind!r}")


def make_split(cfg: TaskConfig) -> Dict[str, List[Dict[str, str]]]:
    """{"train": [...], "eval": [...]} with no eval prompt among the training prompts."""
    if cfg.kind not in TASKS:
        raise ValueError(f"task.kind: expected one of {TASKS}, got {cfg.kind!r}")
    if not 1 <= cfg.min_len <= cfg.max_len:
        raise ValueError(f"task.min_len/max_len: expected 1 <= min_len <= max_len, got {cfg.min_len}, {cfg.max_len}")
    rng = random.Random(cfg.seed)
    eval_records: Dict[str, Dict[str, str]] = {}
    attempts = 0
    while len(eval_records) < cfg.eval_size:
        record = _example(cfg.kind, rng, cfg)
        eval_records.setdefault(record["prompt"], record)
        attempts += 1
        if attempts > 100 * cfg.eval_size:
            raise ValueError(f"task: cannot draw {cfg.eval_size} distinct eval prompts; widen min_len/max_len")
    train = []
    while len(train) < cfg.train_size:
        record = _example(cfg.kind, rng, cfg)
        if record["prompt"] not in eval_records:
            train.append(record)
    return {"train": train, "eval": list(eval_records.values())}


def make_records(kind: str, n: int, *, seed: int = 0, **options) -> List[Dict[str, str]]:
    """`n` training records of task `kind` (options: TaskConfig fields)."""
    return make_split(TaskConfig(kind=kind, train_size=n, eval_size=0, seed=seed, **options))["train"]


def score_model(model, tokenizer, records: Sequence[Dict[str, str]], *, max_new_tokens: int = 12,
                batch_size: int = 64) -> float:
    """Greedy exact-match accuracy of `model` on `records` (prompt + answer).

    Returns:
        The fraction of records whose greedy completion (decoded, special tokens
        skipped) equals the answer.
    """
    if not records:
        raise ValueError("records: expected at least one record to score")
    texts = greedy_texts(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sum(exact_match(r["prompt"], t, answer=r["answer"]) for r, t in zip(records, texts)) / len(records)


def sample_completions(model, tokenizer, records: Sequence[Dict[str, str]], *, max_new_tokens: int = 12) -> List[str]:
    """Greedy completions as text (for the report's examples)."""
    return greedy_texts(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=len(records) or 1)
