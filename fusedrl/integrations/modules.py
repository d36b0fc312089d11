"""`torch.nn.Module` wrappers of the fused losses, with Liger/TRL argument names.

    FusedLinearLogprobs          per-token log p (and entropy) from hidden states (no logits)
    FusedLinearCrossEntropyLoss  as Liger's LigerFusedLinearCrossEntropyLoss: forward(lin_weight, _input, target, bias)
    FusedLinearGRPOLoss          as Liger's LigerFusedLinearGRPOLoss / TRL's GRPO loss types
                                 grpo, bnpo, dr_grpo, dapo: forward(_input, lin_weight, selected_token_ids,
                                 attention_mask, advantages, bias, ref_per_token_logps, old_per_token_logps)
    FusedPolicyLoss              fusedrl's policy_loss (ppo, grpo, gspo, cispo, sapo, reinforce) on log-probs
    FusedLinearDPOLoss           as Liger's LigerFusedLinearDPOLoss: forward(lin_weight, _input, target, bias,
                                 ref_input, ref_weight, ref_bias), chosen rows first; loss_type sigmoid, ipo,
                                 apo_zero, apo_down

Every module holds only its options (no parameters); the LM-head weight is passed in, as
Liger's modules take it, so it stays the model's own (tied or not) parameter.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fusedrl.kernels import (apo_down_loss, apo_zero_loss, dpo_loss, ipo_loss, linear_logprobs, linear_policy_loss,
                             policy_loss)

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
DPO_LOSS_TYPES = {"sigmoid": dpo_loss, "ipo": ipo_loss, "apo_zero": apo_zero_loss, "apo_down": apo_down_loss}


class FusedLinearLogprobs(nn.Module):
    """log p(target) (and entropy) of softmax((_input @ lin_weight^T + bias) / temperature), fused."""

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False):
        super().__init__()
        self.temperature, self.ignore_index, self.return_entropy = temperature, ignore_index, return_entropy

    def forward(self, _input: torch.Tensor, lin_weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        return linear_logprobs(_input, lin_weight, target, bias=bias, temperature=self.temperature,
                               ignore_index=self.ignore_index, return_entropy=self.return_entropy)


class FusedLinearCrossEntropyLoss(nn.Module):
    """Cross-entropy of the LM head without logits; reduction "mean" (over non-ignored) or "sum"."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        nll = -linear_logprobs(_input, lin_weight, target, bias=bias, ignore_index=self.ignore_index).sum()
        if self.reduction == "sum":
            return nll
        return nll / (target != self.ignore_index).sum().clamp(min=1)


def grpo_aggregation(loss_type: str, max_completion_length: Optional[int]):
    """fusedrl aggregation options of a TRL/Liger GRPO `loss_type`."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "grpo":
        return dict(aggregation="seq_mean")
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        return dict(aggregation="seq_mean_fixed_len", max_len=int(max_completion_length))
    return dict(aggregation="token_mean")


class FusedLinearGRPOLoss(nn.Module):
    """GRPO-family loss from final hidden states (clipped surrogate, k3 KL to a reference).

    Per token: -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) + beta * k3(logp, ref);
    aggregated as TRL's `loss_type`: grpo (per-sequence token mean, then mean), bnpo / dapo
    (token mean over the batch; dapo's global count via `num_items_in_batch`), dr_grpo
    (sum / (B * max_completion_length)). Returns (loss, metrics) as `policy_loss`.
    """

    def __init__(self, beta: float = 0.04, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "bnpo", max_completion_length: Optional[int] = None, temperature: float = 1.0):
        super().__init__()
        self.options = dict(algo="grpo", eps_low=epsilon_low, eps_high=epsilon_high, beta=beta, kl_kind="k3",
                            **grpo_aggregation(loss_type, max_completion_length))
        self.loss_type, self.temperature = loss_type, temperature

    def forward(self, _input: torch.Tensor, lin_weight: torch.Tensor, selected_token_ids: torch.Tensor,
                attention_mask: torch.Tensor, advantages: torch.Tensor, bias: Optional[torch.Tensor] = None,
                ref_per_token_logps: Optional[torch.Tensor] = None,
                old_per_token_logps: Optional[torch.Tensor] = None, num_items_in_batch=None):
        beta = self.options["beta"] if ref_per_token_logps is not None else 0.0
        extra = dict(num_tokens=num_items_in_batch) if num_items_in_batch is not None else {}
        return linear_policy_loss(_input, lin_weight, selected_token_ids, old_per_token_logps, advantages,
                                  attention_mask, bias=bias, temperature=self.temperature,
                                  ref_logp=ref_per_token_logps, compute_entropy=True,
                                  **dict(self.options, beta=beta), **extra)


class FusedPolicyLoss(nn.Module):
    """fusedrl's `policy_loss` as a module: options at construction, tensors at call."""

    def __init__(self, algo: str = "ppo", **options):
        super().__init__()
        self.options = dict(options, algo=algo)

    def forward(self, logp: torch.Tensor, old_logp: Optional[torch.Tensor], advantages: torch.Tensor,
                mask: Optional[torch.Tensor] = None, **tensors):
        return policy_loss(logp, old_logp, advantages, mask, **tensors, **self.options)


def _sequence_logps(hidden, weight, target, bias, ignore_index, average):
    logp = linear_logprobs(hidden, weight, target, bias=bias, ignore_index=ignore_index)
    total = logp.sum(-1)
    return total / (target != ignore_index).sum(-1).clamp(min=1) if average else total


class FusedLinearDPOLoss(nn.Module):
    """DPO-family loss from final hidden states: rows [:B] chosen, [B:] rejected (Liger's layout).

    `_input` (2B, T, H) and `target` (2B, T) are aligned (position t scores target[t]);
    -100 targets are not scored. Sequence log-probs are sums over tokens (means with
    `average_log_prob`). The reference comes from `ref_input` (with `ref_weight`/`ref_bias`,
    default the policy head) under no_grad. Returns (loss, metrics) as `dpo_loss`.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, loss_type: str = "sigmoid",
                 average_log_prob: bool = False, use_ref_model: bool = True):
        super().__init__()
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {sorted(DPO_LOSS_TYPES)}, got {loss_type!r}")
        self.ignore_index, self.beta, self.loss_type = ignore_index, beta, loss_type
        self.average_log_prob, self.use_ref_model = average_log_prob, use_ref_model

    def forward(self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None, ref_input: Optional[torch.Tensor] = None,
                ref_weight: Optional[torch.Tensor] = None, ref_bias: Optional[torch.Tensor] = None):
        if _input.shape[0] % 2:
            raise ValueError(f"_input must hold chosen then rejected rows (even batch), got {tuple(_input.shape)}")
        logps = _sequence_logps(_input, lin_weight, target, bias, self.ignore_index, self.average_log_prob)
        if self.use_ref_model:
            if ref_input is None:
                raise ValueError("use_ref_model=True needs ref_input (the reference model's hidden states)")
            with torch.no_grad():
                ref = _sequence_logps(ref_input, lin_weight if ref_weight is None else ref_weight, target,
                                      bias if ref_weight is None else ref_bias, self.ignore_index,
                                      self.average_log_prob)
        else:
            ref = torch.zeros_like(logps).detach()
        half = logps.shape[0] // 2
        fn = DPO_LOSS_TYPES[self.loss_type]
        return fn(logps[:half], logps[half:], ref[:half], ref[half:], beta=self.beta)
