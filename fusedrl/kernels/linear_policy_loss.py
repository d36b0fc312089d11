"""From final hidden states to the policy loss without materialising the (N, V) logits.

    logp_t, H_t = linear_logprobs(hidden, weight, labels, bias, temperature)   (fused, chunked over V)
    loss, metrics = policy_loss(logp, old_logp, advantages, mask & (labels != ignore_index), ...)

Composed from the two public ops, so it gets whatever backend each of them
dispatches to (Triton on CUDA): the LM head runs inside the log-prob kernel
and the per-token objective inside the policy-loss kernel; the only per-token
tensors in between are logp (and the entropy when asked for), (N,) float32.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._autocast import autocast_aware
from ._validate import check_tensor
from .logprobs import linear_logprobs
from .policy_loss import policy_loss
from ._ranges import op_range


@op_range("linear_policy_loss")
@autocast_aware("keep")
def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = False,
    **policy_options,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Policy loss of the LM head's log-probs of `labels`, fused end to end.

    Args:
        hidden: (B, T, H) padded or (total, H) packed final hidden states (bf16/fp16/fp32).
        weight: (V, H) LM-head weight; bias: None or (V,).
        labels: (B, T) or (total,) int token ids; `ignore_index` positions are not trained.
        old_logp: per-token log-probs of labels' shape, or None for on-policy (old = sg(logp)).
        advantages: per token (labels' shape) or per sequence (B,) (`advantages_layout=` when ambiguous).
        mask: None or labels' shape; combined with labels != ignore_index.
        temperature: logits are divided by it (the sampling temperature).
        compute_entropy: compute per-token entropies for the "entropy" metric; implied
            by an entropy bonus (c_ent > 0).
        **policy_options: every keyword of `policy_loss` except `entropy` (cu_seqlens,
            advantages_layout, algo, the clip / KL / entropy / importance-weight options, the three
            aggregations, normalisers, Clip-Cov / KL-Cov options, seq_ratio, generator); each gives
            the same loss as `policy_loss` on these log-probs.
    Returns:
        (loss, metrics) as `policy_loss`; gradients flow to hidden, weight and bias.
    """
    if "entropy" in policy_options:
        raise TypeError("linear_policy_loss computes the entropy itself: pass compute_entropy=True, not entropy=")
    check_tensor("labels", labels, dtypes=(torch.int32, torch.int64))
    need_entropy = bool(compute_entropy) or policy_options.get("c_ent", 0.0) > 0
    out = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=need_entropy)
    logp, entropy = out if need_entropy else (out, None)
    trained = labels != ignore_index
    if mask is not None:
        check_tensor("mask", mask)
        if mask.shape != labels.shape:
            raise ValueError(f"mask must have labels' shape {tuple(labels.shape)}, got {tuple(mask.shape)}")
        trained = trained & (mask != 0)
    return policy_loss(logp, old_logp, advantages, trained, entropy=entropy, **policy_options)
