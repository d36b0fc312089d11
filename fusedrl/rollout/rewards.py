"""Rewards for RL rollouts: verifiers named as `module:function`, and built-in verifiers for the demo tasks.

A verifier scores one completion:

    fn(prompt: str, completion: str, **fields) -> float

`fields` are the prompt record's other fields (e.g. `answer`), so one
dataset file serves SFT, rejection sampling and RL. Name it in a config as
"package.module:function":

    verifier = load_verifier("fusedrl.rollout.rewards:exact_match")
    scores = score_completions(verifier, prompts, completions, records)   # (N,) float32

Built-ins (for records that carry an `answer`, e.g. the demo tasks of `fusedrl.demo.tasks`):

    exact_match        1 when the stripped completion equals the answer
    char_accuracy      partial credit: matching characters / max(len(completion), len(answer))
    shaped_match       char_accuracy, plus 1 for an exact match (dense and still prefers exact answers)
    ends_cleanly       format check: 1 when the completion has no whitespace padding and is not empty

Reward models (a `ScalarHeadModel`) are scored by `reward_model_scores`.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
from typing import Callable, Dict, List, Sequence

import torch

from fusedrl.data.packed import Example, pack_balanced
from fusedrl.config_io import ConfigError

__all__ = ["load_verifier", "score_completions", "reward_model_scores", "exact_match", "char_accuracy", "shaped_match", "ends_cleanly"]

Verifier = Callable[..., float]
_POSITIONAL = ("prompt", "completion")  # record fields never passed as keywords


logger = logging.getLogger("fusedrl")

def exact_match(prompt: str, completion: str, answer: str = None, **fields) -> float:
    """1.0 when the completion (its EOS and surrounding spaces removed) equals the answer, else 0.0."""
    if answer is None:
        raise ValueError(f"answer: exact_match needs the record's reference answer (prompt {prompt!r})")
    return 1.0 if completion.strip() == str(answer).strip() else 0.0


def load_verifier(spec: str, *, what: str = "verifier") -> Verifier:
    """Import the function named by `spec` ("package.module:function").

    Args:
        spec: "module:function"; the function may be nested ("module:Class.method").
        what: the config key being loaded, for error messages ("verifier", "rollout.format_verifier", ...).
    Returns:
        The callable.
    Raises:
        TypeError: spec is not a string, or names something that is not callable.
        ValueError: spec is malformed, the module cannot be imported, or has no such attribute.
    """
    if not isinstance(spec, str):
        raise TypeError(f"{what}: expected a 'module:function' string, got {type(spec).__name__}")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip() or ":" in attr:
        raise ConfigError.message(what, f"{what}: expected 'module:function' (e.g. 'fusedrl.rollout.rewards:exact_match'), "
                         f"got {spec!r}")
    try:
        module = importlib.import_module(module_name.strip())
    except ImportError as err:
        raise ConfigError.message(what, f"{what}: cannot import module {module_name!r} named in {spec!r}: "
                         f"{type(err).__name__}: {err}") from err
    logger.info("%s: %r runs code from %s", what, spec, getattr(module, "__file__", None) or "a built-in module")
    target = module
    for part in attr.strip().split("."):
        if not hasattr(target, part):
            raise ConfigError.message(what, f"{what}: module {module_name!r} has no attribute {attr!r} (named in {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{what}: {spec!r} is a {type(target).__name__}, expected a function "
                        "fn(prompt, completion, **fields) -> float")
    _check_signature(target, spec, what)
    return target


def _check_signature(fn: Verifier, spec: str, what: str) -> None:
    """Fail at load time, not mid-run, when fn cannot take (prompt, completion, **fields)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        sig.bind("prompt", "completion")
    except TypeError as err:
        raise TypeError(f"{what}: {spec!r} must accept (prompt, completion, **fields), "
                        f"its signature is {sig}: {err}") from None


def score_completions(verifier: Verifier, prompts: Sequence[str], completions: Sequence[str],
                      records: Sequence[dict], *, name: str = "verifier") -> torch.Tensor:
    """Score each completion with `verifier(prompt, completion, **fields)`.

    Args:
        verifier: a loaded verifier.
        prompts, completions: N strings each (completion text without special tokens).
        records: N prompt records; every field except "prompt" and "completion" (an SFT record's
            reference completion, which would clash with the sampled one) is passed as a keyword;
            fields the verifier does not accept are dropped when it takes no **kwargs.
        name: how to name the verifier in errors.
    Returns:
        (N,) float32 rewards (host tensor).
    Raises:
        ValueError: a score is not a finite real number (naming the sample and its value).
    """
    if not (len(prompts) == len(completions) == len(records)):
        raise ValueError(f"prompts, completions, records: expected equal lengths, got "
                         f"{len(prompts)}, {len(completions)}, {len(records)}")
    accepts = _accepted_fields(verifier)
    scores: List[float] = []
    for i, (prompt, completion, record) in enumerate(zip(prompts, completions, records)):
        fields: Dict = {k: v for k, v in record.items()
                        if k not in _POSITIONAL and (accepts is None or k in accepts)}
        value = verifier(prompt, completion, **fields)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"{name}: returned {value!r} for sample {i} (prompt {prompt!r:.60}, completion "
                             f"{completion!r:.60}); expected a finite float")
        scores.append(float(value))
    return torch.tensor(scores, dtype=torch.float32)


def _accepted_fields(fn: Verifier):
    """Keyword names fn accepts, or None when it takes **kwargs (or has no inspectable signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}


@torch.no_grad()
def reward_model_scores(reward_model, examples: List[Example], token_budget: int) -> torch.Tensor:
    """Score prompt + completion sequences with a scalar-head model (`scores(batch)` at the last token).

    The one reward-model scoring function (RL rewards, rejection sampling, the demo), in eval mode.

    Returns:
        (N,) float32 host tensor, in the order of `examples`.
    """
    device = next(reward_model.parameters()).device
    out = torch.zeros(len(examples), dtype=torch.float32)
    was_training = reward_model.training
    reward_model.eval()
    try:
        for batch in pack_balanced(examples, token_budget):
            scores = reward_model.scores(batch.to(device)).float().cpu()  # (num_seqs,)
            out[batch.extras["example_index"]] = scores
    finally:
        reward_model.train(was_training)
    return out


# ----------------------------------------------------------------------------- built-in verifiers

def char_accuracy(prompt: str, completion: str, answer: str = None, **fields) -> float:
    """Partial credit in [0, 1]: characters equal at the same position / max(len(completion), len(answer))."""
    if answer is None:
        raise ValueError(f"answer: char_accuracy needs the record's reference answer (prompt {prompt!r})")
    got, want = completion.strip(), str(answer).strip()
    longest = max(len(got), len(want))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(got, want)) / longest


def shaped_match(prompt: str, completion: str, answer: str = None, **fields) -> float:
    """char_accuracy + exact_match, in [0, 2]: a dense signal that still ranks exact answers first."""
    return char_accuracy(prompt, completion, answer) + exact_match(prompt, completion, answer)


def ends_cleanly(prompt: str, completion: str, **fields) -> float:
    """A format check: 1.0 for a non-empty completion without surrounding whitespace, else 0.0."""
    return 1.0 if completion and completion == completion.strip() else 0.0
