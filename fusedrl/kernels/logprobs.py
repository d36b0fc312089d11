"""Per-token log-probs (and entropy) from hidden states or logits.

Public ops: `linear_logprobs`, `logprobs_from_logits`. The Triton kernels are
being built (issue 3); until then both ops run the exact reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import linear_logprobs_reference, logprobs_from_logits_reference


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log p(label) of softmax((hidden @ weight.T + bias) / temperature) per token."""
    return linear_logprobs_reference(
        hidden, weight, labels, bias=bias, temperature=temperature,
        ignore_index=ignore_index, return_entropy=return_entropy,
    )


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log p(label) of softmax(logits / temperature) per token."""
    return logprobs_from_logits_reference(
        logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )
