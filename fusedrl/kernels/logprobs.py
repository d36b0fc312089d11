"""Per-token log-probs (and entropy) from hidden states or logits, without the (N, V) logits.

    z = (hidden @ weight^T + bias) / temperature
    logp[n] = z[n, label[n]] - logsumexp(z[n]),  entropy[n] = logsumexp(z[n]) - sum_v p[n, v] z[n, v]

Public ops: `linear_logprobs`, `logprobs_from_logits`. On CUDA tensors with Triton
importable (or under `force_backend("triton")` with TRITON_INTERPRET=1) they run the
fused Triton kernels of `_logprobs_triton`; otherwise the exact, token-chunked PyTorch
reference of `_logprobs_ref`. float64 inputs always take the reference. Under
`fusedrl.kernels.invariant()` `linear_logprobs` runs the fixed-tile path of
`_invariant_logprobs` (Triton with pinned tiles where Triton would run).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _dispatch
from ._autocast import autocast_aware
from ._invariant_logprobs import invariant_linear_logprobs, invariant_sample_logprobs
from .invariant import is_invariant
from ._logprobs_ref import (
    LinearLogprobsRef,
    LogitsLogprobsRef,
    unflatten_outputs,
    validate_linear,
    validate_logits,
)
from ._ranges import op_range

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_ok(*tensors: Optional[torch.Tensor]) -> bool:
    floats = [t for t in tensors if t is not None and t.is_floating_point()]
    return _dispatch.use_triton(*tensors) and all(t.dtype in _TRITON_DTYPES for t in floats)


@op_range("linear_logprobs")
@autocast_aware("keep")
def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_logit_stats: bool = False,
):
    """Per-token log p(label) (and entropy) of softmax((hidden @ weight.T + bias) / temperature).

    The LM head, log-softmax and label gather fused: the (N, V) logits are never
    materialised, forward or backward, and gradients are exact (no filtering).

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64 final hidden states; any strides.
        weight: (V, H) LM-head (or tied embedding) weight, any float dtype.
        labels: (...) int32/int64 token ids in [0, V), or `ignore_index`. Out-of-range
            labels raise ValueError on CPU; on GPU they are not checked (a check would need
            a host sync) and give meaningless values, never a memory fault.
        bias: optional (V,) LM-head bias.
        temperature: > 0; the softmax is taken over logits / temperature.
        ignore_index: label value whose positions give 0 and receive 0 gradient.
        return_entropy: also return the entropy of the distribution per token.
        return_logit_stats: also return `mean_logits` (...), the mean over the vocabulary of
            the temperature-scaled logits, and `is_top1` (...) bool, whether the label is the
            argmax (first maximum on ties); both 0/False at ignored positions, no gradient.
            The Triton path computes them in the same pass; the reference path in one
            extra no-grad pass.

    Under `torch.autocast` nothing is cast down: the inputs keep their dtypes, logits are
    accumulated and log-softmaxed in float32 (see `fusedrl.kernels._autocast`).

    Returns:
        logp (...) float32 (float64 for float64 inputs); then entropy (...) of the same dtype
        when `return_entropy`; then mean_logits (...) and is_top1 (...) when
        `return_logit_stats` (a tuple whenever more than logp is returned).
        Differentiable w.r.t. hidden, weight and bias.
    """
    validate_linear(hidden, weight, labels, bias, temperature, ignore_index)
    if not isinstance(return_logit_stats, bool):
        raise TypeError(f"return_logit_stats must be a bool, got {type(return_logit_stats).__name__}")
    lead = tuple(hidden.shape[:-1])
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1).contiguous()  # the kernels index labels densely
    args = (hidden2d, weight, bias, labels1d, float(temperature), ignore_index, bool(return_entropy))
    if is_invariant() and not return_logit_stats:  # fixed tiles: bitwise the same in any layout
        out = invariant_linear_logprobs(*args, use_triton=_triton_ok(hidden, weight, bias, labels))
        return unflatten_outputs(out, lead, return_entropy)
    if _triton_ok(hidden, weight, bias, labels):
        from ._logprobs_triton import LinearLogprobsTriton

        if return_logit_stats:
            out = LinearLogprobsTriton.apply(*args, True)
            return tuple(t.reshape(lead) for t in out)
        out = LinearLogprobsTriton.apply(*args)
    else:
        out = LinearLogprobsRef.apply(*args)
        if return_logit_stats:
            from ._logit_stats import logit_stats_reference

            stats = logit_stats_reference(hidden2d, weight, bias, labels1d, float(temperature), ignore_index)
            out = (out if return_entropy else (out,)) + stats
            return tuple(t.reshape(lead) for t in out)
    return unflatten_outputs(out, lead, return_entropy)


@torch.no_grad()
def sample_with_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         temperature: float, choose):
    """A sampler's LM head: tokens from the logits, and the tokens' log-probs as `linear_logprobs`.

    `choose(logits (N, V) float32)` returns (tokens (N,) int64, extra). The log-probs are
    `linear_logprobs(hidden, weight, tokens, bias=bias, temperature=temperature)` to the bit; in
    invariant mode on the PyTorch path they come from the very logits `choose` saw (one LM-head
    matmul instead of two). Returns (tokens, logp (N,) float32, extra). No autograd.
    """
    if is_invariant() and not _triton_ok(hidden, weight, bias):
        return invariant_sample_logprobs(hidden, weight, bias, float(temperature), choose)
    tokens, extra = choose(F.linear(hidden, weight, bias).float())
    logp = linear_logprobs(hidden, weight, tokens, bias=bias, temperature=temperature).float()
    return tokens, logp, extra


@op_range("logprobs_from_logits")
@autocast_aware("keep")
def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Per-token log p(label) (and entropy) of softmax(logits / temperature).

    One pass over the logits forward, one backward (writing d(logits) in the logits'
    dtype); no float32 copy of the logits is made.

    Args:
        logits: (..., V) float16/bfloat16/float32/float64.
        labels: (...) int32/int64 in [0, V) or `ignore_index` (range checked on CPU only).
        temperature: > 0.
        ignore_index: label value whose positions give 0 and receive 0 gradient.
        return_entropy: also return the per-token entropy.

    Returns:
        logp (...) float32 (float64 for float64 logits) [, entropy (...) same dtype].
    """
    validate_logits(logits, labels, temperature, ignore_index)
    lead = tuple(logits.shape[:-1])
    args = (logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).contiguous(), float(temperature), ignore_index,
            bool(return_entropy))
    if _triton_ok(logits, labels):
        from ._logits_logprobs_triton import LogitsLogprobsTriton

        out = LogitsLogprobsTriton.apply(*args)
    else:
        out = LogitsLogprobsRef.apply(*args)
    return unflatten_outputs(out, lead, return_entropy)
