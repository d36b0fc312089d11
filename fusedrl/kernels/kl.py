"""Per-token KL estimators (Schulman's k1 / k2 / k3) and the adaptive KL controller.

With delta = logp - ref_logp (samples drawn from the policy):

    k1  = delta                         unbiased, can be negative
    k2  = delta^2 / 2                   biased, low variance
    k3  = exp(-delta) - 1 + delta       unbiased, >= 0   (note: exp(ref - logp))
    k3+ = value of k3, gradient of k2   (straight-through: k2 + sg(k3 - k2))
    abs = |delta|                       (verl "abs"; gradient sign(delta))
    k1+ = value of k1, gradient of k2   (verl "k1+": k2 + sg(k1 - k2))

Near delta = 0, exp(-delta) - 1 + delta loses every digit and even
expm1(-delta) + delta in the same precision cancels to noise. So float64 k3 is
expm1(-delta) + delta, and for |delta| < 0.1 its Taylor series
sum_{k=2..8} (-delta)^k / k! (truncation below 1e-12 relative); float32 (and
lower) k3 is expm1(-delta) + delta evaluated in float64 and rounded, as precise
as float32 allows for |delta| >= 1e-8 (`k3_and_grad`). The gradient is
-expm1(-delta) in the input's precision. Optionally delta is clamped to
[-clamp, clamp] before the estimator, and the estimate itself to
[-value_clamp, value_clamp] after it (verl's low_var_kl: delta clamped to
+-20, k3 to +-10); each clamp stops the gradient outside its range, as
torch.clamp does.
Elementwise math that XLA-style fusers handle well; the policy-loss Triton
kernel carries its own copy of these formulas for the fused path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._ranges import op_range
from ._validate import FLOAT_DTYPES, check_tensor

try:  # csrc/kl.cpp: float32 k3 on the CPU in one vectorised pass; the PyTorch path below otherwise
    from . import _cpu as _C
except ImportError:  # built without the extensions (FUSEDRL_NO_EXT=1)
    _C = None

KL_KINDS = ("k1", "k2", "k3", "k3+", "abs", "k1+")


def check_kl_kind(kind, name: str = "kind") -> str:
    if kind not in KL_KINDS:
        raise ValueError(f"{name} must be one of {KL_KINDS}, got {kind!r}")
    return kind


def check_clamp(clamp, name: str = "clamp") -> None:
    if clamp is None:
        return
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)):
        raise TypeError(f"{name} must be None or a positive number, got {type(clamp).__name__}")
    if not clamp > 0:
        raise ValueError(f"{name} must be > 0, got {clamp}")


@op_range("kl_penalty")
def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: str = "k3",
    *,
    clamp: Optional[float] = None,
    value_clamp: Optional[float] = None,
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference.

    Args:
        logp: (...) float, log pi_theta of the sampled tokens (differentiable).
        ref_logp: (...) float, same shape, log pi_ref of the same tokens.
        kind: "k1", "k2", "k3", "k3+", "abs" or "k1+" (see the module docstring).
        clamp: None (default, exact) or c > 0: clamp delta = logp - ref_logp to
            [-c, c] before the estimator (10 is the usual choice) to avoid exp overflow.
        value_clamp: None or c > 0: clamp the estimate to [-c, c] (verl clamps k3 to +-10).

    Returns:
        (...) float32 (float64 for float64 inputs) per-token estimate; gradients
        flow to both inputs.
    """
    check_tensor("logp", logp, dtypes=FLOAT_DTYPES)
    check_tensor("ref_logp", ref_logp, dtypes=FLOAT_DTYPES)
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    check_kl_kind(kind)
    check_clamp(clamp)
    check_clamp(value_clamp, "value_clamp")
    dtype = torch.float64 if torch.float64 in (logp.dtype, ref_logp.dtype) else torch.float32
    if kind == "k3" and clamp is None and _C is not None and logp.dtype == ref_logp.dtype == torch.float32 \
            and logp.device.type == ref_logp.device.type == "cpu":
        kl = _K3Pair.apply(logp, ref_logp)  # the subtraction fused into the C++ pass
        return kl if value_clamp is None else kl.clamp(-value_clamp, value_clamp)
    delta = logp.to(dtype) - ref_logp.to(dtype)
    return kl_from_delta(delta, kind, clamp, value_clamp)


def kl_from_delta(delta: torch.Tensor, kind: str, clamp: Optional[float] = None,
                  value_clamp: Optional[float] = None) -> torch.Tensor:
    """The estimator applied to delta = logp - ref_logp (no validation; used by the losses)."""
    if clamp is not None:
        delta = delta.clamp(-clamp, clamp)
    kl = _estimate(delta, kind)
    return kl if value_clamp is None else kl.clamp(-value_clamp, value_clamp)


def _estimate(delta: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "k1":
        return delta
    if kind == "abs":
        return delta.abs()
    if kind == "k3":
        return k3_value(delta)
    k2 = 0.5 * delta * delta
    if kind == "k2":
        return k2
    if kind == "k1+":
        return k2 + (delta - k2).detach()
    return k2 + (k3_value(delta) - k2).detach()  # k3+


K3_SERIES_BELOW = 0.1


def k3_value(delta: torch.Tensor) -> torch.Tensor:
    """exp(-delta) - 1 + delta, precise near 0 (module docstring); differentiable.

    One autograd node: the value and the gradient 1 - exp(-delta) = -expm1(-delta)
    from one pass without a graph (`k3_and_grad`); backward is one multiply.
    """
    if delta.requires_grad and torch.is_grad_enabled():
        return _K3.apply(delta)
    return k3_and_grad(delta, need_grad=False)[0]


class _K3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, delta):
        value, grad = k3_and_grad(delta)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: a second derivative would be wrong, so it raises
    def backward(ctx, grad):
        (dk3,) = ctx.saved_tensors
        return dk3 * grad


class _K3Pair(torch.autograd.Function):
    """k3 of delta = logp - ref for float32 CPU tensors in one C++ pass (csrc/kl.cpp), the same
    values as `_K3` of the float32 difference; gradients +-dk3 to logp and ref."""

    @staticmethod
    def forward(ctx, logp, ref):
        value, grad = _k3_and_grad_cpp(logp.detach(), any(ctx.needs_input_grad), ref=ref.detach())
        if grad is not None:
            ctx.save_for_backward(grad)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, up):
        (dk3,) = ctx.saved_tensors
        g = dk3 * up
        return (g if ctx.needs_input_grad[0] else None), (-g if ctx.needs_input_grad[1] else None)


def k3_and_grad(delta: torch.Tensor, need_grad: bool = True):
    """(k3(delta), d k3 / d delta = -expm1(-delta) or None), no graph, in delta's dtype.

    float32 on the CPU: the C++ loop of csrc/kl.cpp (`_k3_and_grad_cpp`), one vectorised pass
    in double (series below |delta| = 1/4, exp beyond), each output rounded once.
    Otherwise below float64, in float64: e = expm1(-delta) has a relative error of 1e-16, so
    e + delta keeps ~16 - log10(2 / |delta|) digits, float32's (and more) for every
    |delta| above 1e-8 (a float32 difference of log-probs near -1 is 0 or >= 6e-8);
    one expm1 gives the value and the gradient (5 passes instead of the series'
    ~25, see bench/NOTES.md). float64 keeps the series (`_k3_nograd`).
    """
    with torch.no_grad():
        if delta.dtype == torch.float64:
            return _k3_nograd(delta), (torch.neg(delta).expm1_().neg_() if need_grad else None)
        if _C is not None and delta.dtype == torch.float32 and delta.device.type == "cpu":
            return _k3_and_grad_cpp(delta, need_grad)
        e = delta.double().neg_().expm1_()
        grad = e.to(delta.dtype).neg_() if need_grad else None
        return e.add_(delta).to(delta.dtype), grad


def _k3_and_grad_cpp(delta: torch.Tensor, need_grad: bool, ref: Optional[torch.Tensor] = None):
    """`k3_and_grad` of a float32 CPU tensor by the C++ loop of csrc/kl.cpp: value and gradient in
    one vectorised pass, each rounded once from double (within ~1 ulp; no float64 temporaries).
    With `ref` (same shape, float32) the input is delta - ref, subtracted in the loop."""
    delta = delta.contiguous()
    ref = None if ref is None else ref.contiguous()
    value = torch.empty_like(delta)
    grad = torch.empty_like(delta) if need_grad else None
    _C.k3_f32(delta.data_ptr(), delta.numel(), value.data_ptr(), grad.data_ptr() if need_grad else 0,
              0 if ref is None else ref.data_ptr())
    return value, grad


def _k3_nograd(delta: torch.Tensor) -> torch.Tensor:
    """k3 without autograd, the very formula of `_k3_series` in fewer allocations: the series
    on delta clamped to the series' range (its value is kept only there), in place."""
    with torch.no_grad():
        small = delta.abs() < K3_SERIES_BELOW
        d = delta.clamp(-K3_SERIES_BELOW, K3_SERIES_BELOW)
        t = d / 40320
        for c in (1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6):  # t <- d * (c - t)
            t.neg_().add_(c).mul_(d)
        series = d.square_().mul_(t.neg_().add_(0.5))
        big = torch.neg(delta).expm1_().add_(delta)
        return torch.where(small, series, big, out=big)


def _k3_series(delta: torch.Tensor) -> torch.Tensor:
    """The Taylor series for |delta| < 0.1, expm1(-delta) + delta beyond (module docstring)."""
    small = delta.abs() < K3_SERIES_BELOW
    d = torch.where(small, delta, torch.zeros_like(delta))  # keeps the series' gradient finite everywhere
    series = d * d * (0.5 - d * (1.0 / 6 - d * (1.0 / 24 - d * (1.0 / 120 - d * (1.0 / 720 - d * (1.0 / 5040 - d / 40320))))))
    return torch.where(small, series, torch.expm1(-delta) + delta)


class AdaptiveKLController:
    """Adaptive beta of Ziegler et al. (2019): steer the measured KL towards a target.

    beta <- beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)

    Host-side: call `update` with a float KL already brought to the host for logging.
    """

    def __init__(self, init_beta: float, target: float, horizon: int):
        for name, value in (("init_beta", init_beta), ("target", target), ("horizon", horizon)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update beta from the KL measured over the last `n_steps` samples; returns the new beta."""
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta
