"""Autocast policy of the public ops: one decorator, applied where each op is defined.

Under `torch.autocast` a plain PyTorch op is cast by autocast's op lists (matmul
to bf16/fp16, log_softmax to fp32). A fused op has no entry in those lists, and its
PyTorch reference path would have each inner matmul autocast separately (when the
issue was filed, the (tokens x vocab) logits came out in bf16 and the log-softmax of
bf16 logits lost 2-3 digits: log-p error vs float64 3.4e-2 instead of 7.5e-7). The
decorator gives every public op one documented behaviour, whatever its inner code:

    policy "keep"   (log-prob, policy-loss and preference ops): float inputs are used in
                    their own dtypes (the op promotes mixed inputs to the wider one, as
                    without autocast); nothing is cast down. Autocast is disabled inside
                    the op, so logits are accumulated and log-softmaxed in float32
                    (float64 for float64 inputs) and the outputs are float32.
    policy "lower"  (attention): the listed float inputs are cast to the autocast dtype
                    (`torch.get_autocast_dtype(device)`), as autocast does for
                    `scaled_dot_product_attention`; the kernel accumulates in float32.
                    float64 inputs are left alone.

Casts are ordinary differentiable `.to()` calls, so gradients reach the original
(e.g. float32 master) tensors in their own dtype. Outside autocast the decorator
costs one `torch.is_autocast_enabled` call.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Sequence

import torch

POLICIES = ("keep", "lower")


def _device_type(args, kwargs) -> Optional[str]:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return False


def autocast_aware(policy: str = "keep", cast: Sequence[str] = ()) -> Callable:
    """Decorator: run the op with autocast disabled, after casting `cast` args per `policy`.

    Args:
        policy: "keep" (no input cast; float32 math) or "lower" (cast the float tensors
            named in `cast` to the autocast dtype first).
        cast: parameter names of the decorated function cast under "lower".
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "keep" and cast:
        raise ValueError("cast= applies to policy 'lower' only")

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        for name in cast:
            if name not in signature.parameters:
                raise ValueError(f"{fn.__name__} has no parameter {name!r} to cast")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            device_type = _device_type(args, kwargs)
            if device_type is None or not _autocast_on(device_type):
                return fn(*args, **kwargs)
            if cast:
                dtype = torch.get_autocast_dtype(device_type)
                bound = signature.bind(*args, **kwargs)
                for name in cast:
                    value = bound.arguments.get(name)
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                        bound.arguments[name] = value.to(dtype)
                args, kwargs = bound.args, bound.kwargs
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)

        wrapper.__autocast_policy__ = policy
        return wrapper

    return decorate


class _AutocastOff:
    """Context manager: autocast off on every device type where it is on (cpu, cuda)."""

    def __enter__(self):
        self._contexts = [torch.autocast(d, enabled=False) for d in ("cpu", "cuda") if _autocast_on(d)]
        for ctx in self._contexts:
            ctx.__enter__()
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self._contexts):
            ctx.__exit__(*exc)
        return False


def autocast_off_backward(backward: Callable) -> Callable:
    """Decorator for an autograd.Function's backward: a backward run inside an autocast
    region (some training loops call `.backward()` there) must not recompute the logits
    in bf16 either."""

    @functools.wraps(backward)
    def wrapper(*args, **kwargs):
        with _AutocastOff():
            return backward(*args, **kwargs)

    return wrapper
