"""The one place that decides which backend a kernel op runs on.

Rule: Triton when it is importable and every tensor of the call is on CUDA;
otherwise the exact PyTorch reference. Tests force a path with
`force_backend("triton")` (on CPU this needs `TRITON_INTERPRET=1`, set before
Triton is imported) or `force_backend("reference")`.

The flags are read once at import and never change afterwards.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Iterator, Optional

import torch


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # absent, blocked or broken installs all count as absent
        return False
    return True


HAS_TRITON: bool = _importable("triton")
HAS_FLASH_ATTN: bool = _importable("flash_attn")
TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "triton", "reference")
_forced: Optional[str] = None


def get_backend() -> str:
    """The backend currently forced ("triton" / "reference"), or "auto"."""
    return _forced or "auto"


def set_backend(name: str) -> None:
    """Force every op onto one backend ("auto" restores the default rule)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("backend 'triton' was forced but Triton is not importable")
    _forced = None if name == "auto" else name


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Context manager form of `set_backend`, restoring the previous choice."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an op over these tensors should launch its Triton kernels."""
    present = [t for t in tensors if t is not None]
    if _forced == "reference":
        return False
    if _forced == "triton":
        if not all(t.is_cuda for t in present) and not TRITON_INTERPRET:
            raise RuntimeError(
                "backend 'triton' was forced on CPU tensors: set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels under the interpreter"
            )
        return True
    return HAS_TRITON and bool(present) and all(t.is_cuda for t in present)
