"""Named profiler ranges around fusedrl's public ops and the training loop's phases.

    @op_range("linear_logprobs")          # on a public op, where it is defined
    def linear_logprobs(...): ...

    with phase_range("generate"):         # in the loop / the RL stages
        ...

A user's own profiler then shows `fusedrl.linear_logprobs`, `fusedrl.phase.generate`, ...
by name: a `torch.profiler.profile` trace (CPU and CUDA) holds them as user annotations,
and under Nsight Systems they are NVTX ranges -- either through
`torch.autograd.profiler.emit_nvtx()` (which turns every `record_function` into an NVTX
range) or, without it, with `FUSEDRL_NVTX=1` in the environment (fusedrl then pushes and
pops NVTX ranges itself whenever CUDA is initialised).

Cost when no profiler is active: `torch.compiler.is_compiling()`, one C call (is the autograd profiler on?), an
environment flag read once at import, plus a Python wrapper frame: 0.5-0.7 us per call
measured on a loaded 2-core CPU (tests/profile/test_ranges.py asserts < 5 us; docs/profiling.md),
against ~5 us for one CUDA kernel launch and tens of us for the cheapest op on the CPU. Inside
`torch.compile` the wrapper steps aside (it would break the graph).

Backward passes are not wrapped here: autograd names them after their Function
(e.g. `LinearLogprobsRefBackward` on the CPU path), in the backward pass, outside the op's range.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator

import torch

PREFIX = "fusedrl."
PHASE_PREFIX = "fusedrl.phase."
_NVTX_ENV = os.environ.get("FUSEDRL_NVTX", "").strip().lower() in ("1", "true", "yes", "on")
_profiler_enabled = torch._C._autograd._profiler_enabled
_SYNC_PHASES = False  # `fusedrl profile run`: synchronise CUDA at phase edges so host times are device times


_compiling = torch.compiler.is_compiling  # first in every check: dynamo folds it to True (no graph break)


def _nvtx_on() -> bool:
    return _NVTX_ENV and torch.cuda.is_initialized()


def set_nvtx(enabled: bool) -> None:
    """Turn fusedrl's own NVTX push/pop on or off (the default comes from FUSEDRL_NVTX)."""
    global _NVTX_ENV
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    _NVTX_ENV = enabled


def set_sync_phases(enabled: bool) -> None:
    """Synchronise CUDA at the start and end of every phase range (exact phase times; costs the overlap)."""
    global _SYNC_PHASES
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    _SYNC_PHASES = enabled


def _sync() -> None:
    if _SYNC_PHASES and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def active() -> bool:
    """True when a range would be recorded now (a torch profiler is on, or fusedrl's NVTX is)."""
    return not _compiling() and (_profiler_enabled() or _nvtx_on())


@contextlib.contextmanager
def _recorded(label: str) -> Iterator[None]:
    nvtx = _nvtx_on()
    if nvtx:
        torch.cuda.nvtx.range_push(label)
    try:
        if _profiler_enabled():
            with torch.profiler.record_function(label):
                yield
        else:
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"name: expected a non-empty string without spaces, got {name!r}")
    return name


def op_range(name: str) -> Callable[[Callable], Callable]:
    """Decorator: run the op inside a `fusedrl.<name>` range when a profiler is active.

    Args:
        name: the op's public name, e.g. "linear_logprobs" (the range is "fusedrl.linear_logprobs").
    """
    label = PREFIX + _check_name(name)

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if _compiling() or not (_profiler_enabled() or _NVTX_ENV):
                return fn(*args, **kwargs)
            with _recorded(label):
                return fn(*args, **kwargs)

        wrapper.__fusedrl_range__ = label
        return wrapper

    return decorate


@contextlib.contextmanager
def phase_range(phase: str) -> Iterator[None]:
    """Context manager: a `fusedrl.phase.<phase>` range (generate, score, logprobs, forward_backward, ...)."""
    label = PHASE_PREFIX + _check_name(phase)
    if _compiling() or not (_profiler_enabled() or _NVTX_ENV):
        yield
        return
    _sync()
    with _recorded(label):
        yield
        _sync()
