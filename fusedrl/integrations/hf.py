"""Patch a Hugging Face causal LM so its LM head runs through `linear_logprobs`.

After `patch_causal_lm(model)` (or `apply_fusedrl(model)`), the instance's forward:

- with `labels=` (or `shift_labels=`): returns the causal-LM loss computed from the final
  hidden states by the fused linear log-probs: the (tokens x vocab) logits are never built,
  forward or backward, and `logits` is None in the output (as with Liger's kernels). The
  value equals transformers' `ForCausalLMLoss`: labels shifted by one, -100 ignored, the sum
  divided by `num_items_in_batch` when given (transformers' global token normalisation under
  gradient accumulation), else by the number of non-ignored labels (clamped at 1);
- with `fused_lm_head=True` (TRL's name) and `labels=`: returns a `FusedLogprobsOutput` with
  per-token `log_probs` of the next-token labels, `(B, T - 1)` (or `(B, T)` with
  `shift_labels`), 0 where the label is -100, plus the fields asked for at patch time
  (`entropy`, `mean_logits`, `is_top1`) and that loss;
- otherwise (no labels: generation, evaluation logits): the original forward, unchanged.

Only the positions with a label go through the LM head (the others are never projected).
Models whose logits are soft-capped or rescaled (`final_logit_softcapping`, `logit_scale`,
`logits_scaling`, ...) are refused: the fused head computes plain `h @ W^T + b`; so are MoE
configs with `output_router_logits=True` (their load-balancing loss is not computed here).
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch

from fusedrl.kernels import linear_logprobs

IGNORE_INDEX = -100
OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
_SCALING_ATTRS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index", "logits_to_keep")

try:
    from transformers.utils import ModelOutput
except ImportError:  # pragma: no cover - transformers is a dependency
    ModelOutput = object


@dataclass
class FusedLogprobsOutput(ModelOutput):
    """Output of a patched model called with `fused_lm_head=True` (field names as TRL's
    `FusedCausalLMOutput`, so TRL's trainers read it unchanged). Per-token fields are 0 /
    False where the label is -100 and None when not computed."""

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def check_supported(model) -> None:
    """Raise ValueError unless `model` is a causal LM whose logits are a plain linear head."""
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError(f"model must be a causal LM with an LM head, got {type(model).__name__}")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in _SCALING_ATTRS:
        value = getattr(config, attr, None)
        if value is not None and not (attr in ("logit_scale", "output_multiplier", "lm_head_multiplier",
                                               "logits_scaling") and value == 1):
            raise ValueError(f"{type(model).__name__} rescales its logits ({attr}={value}); the fused log-prob "
                             "head computes plain h @ W^T: use apply_fusedrl(model, logprobs=False)")
    if getattr(config, "output_router_logits", False):
        raise ValueError(f"{type(model).__name__} adds a MoE load-balancing loss (output_router_logits=True), which "
                         "the fused head does not compute: use apply_fusedrl(model, logprobs=False)")


def head_logprobs(model, hidden: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                  outputs: Tuple[str, ...] = ("log_probs",)):
    """Per-token fields (log_probs, entropy|None, mean_logits|None, is_top1|None) of `labels`
    (hidden's leading shape) under the model's LM head; only labelled positions are projected."""
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"outputs must be among {OUTPUTS}, got {sorted(unknown)}")
    head = model.get_output_embeddings()
    hidden = hidden.to(head.weight.device)
    labels = labels.to(head.weight.device)
    mask = labels != IGNORE_INDEX
    entropy, stats = "entropy" in outputs, "mean_logits" in outputs or "is_top1" in outputs
    out = linear_logprobs(hidden[mask], head.weight, labels[mask], bias=head.bias, temperature=temperature,
                          return_entropy=entropy, return_logit_stats=stats)
    out = list(out) if isinstance(out, tuple) else [out]
    logp = out.pop(0)
    ent = out.pop(0) if entropy else None
    mean, top1 = (out[0], out[1]) if stats else (None, None)
    # masked_scatter keeps an all-ignored batch connected to the graph (a differentiable 0)
    spread = [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (logp, ent, mean, top1)]
    return tuple(spread) + (mask,)


def _backbone_hidden(model, args, kwargs):
    for key in _LOSS_KWARGS:
        kwargs.pop(key, None)
    kwargs["use_cache"] = False
    backbone = getattr(model, model.base_model_prefix, None) or model.base_model
    out = backbone(*args, **kwargs)
    return out, out.last_hidden_state


def _shifted(labels: Optional[torch.Tensor], shift_labels: Optional[torch.Tensor]) -> torch.Tensor:
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _loss(logp: torch.Tensor, mask: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if isinstance(denom, torch.Tensor):
        denom = denom.to(logp.device)
    return -logp.sum() / denom


def _causal_lm_output(backbone_out, loss):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in fields(CausalLMOutputWithPast)}
    extra = {k: getattr(backbone_out, k, None) for k in ("cache", "past_key_values", "hidden_states", "attentions")
             if k in names}
    return CausalLMOutputWithPast(loss=loss, logits=None, **extra)


def patch_causal_lm(model, *, temperature: float = 1.0, outputs: Tuple[str, ...] = ("log_probs",)):
    """Replace `model.forward` (this instance only) by the fused-head forward described above.

    Args:
        model: a loaded `*ForCausalLM` instance (Llama, Qwen2, Qwen3, Mistral, Gemma, ...).
        temperature: logits are divided by it in the `fused_lm_head=True` outputs (TRL's
            sampling temperature); the plain `labels=` loss always uses 1.
        outputs: per-token fields of the `fused_lm_head=True` output, among
            "log_probs" (always), "entropy", "mean_logits", "is_top1".
    Returns:
        the model (patched in place). Patching twice replaces the first patch.
    """
    check_supported(model)
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"outputs must be among {OUTPUTS}, got {sorted(unknown)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    original = types.MethodType(type(model).forward, model)

    @functools.wraps(type(model).forward)  # keeps the signature generate() and Trainer inspect
    def forward(self, *args, fused_lm_head: bool = False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head and labels is None and shift_labels is None:
            return original(*args, **kwargs)
        backbone_out, hidden = _backbone_hidden(self, args, kwargs)
        target = _shifted(labels, shift_labels)
        if fused_lm_head:
            if shift_labels is None:
                hidden, target = hidden[:, :-1], target[:, :-1]
            logp, ent, mean, top1, mask = head_logprobs(self, hidden, target, temperature=temperature,
                                                        outputs=outputs)
            return FusedLogprobsOutput(loss=_loss(logp, mask, num_items_in_batch), log_probs=logp, entropy=ent,
                                       mean_logits=mean, is_top1=top1, label_mask=mask)
        logp, _, _, _, mask = head_logprobs(self, hidden, target)
        return _causal_lm_output(backbone_out, _loss(logp, mask, num_items_in_batch))

    model.forward = types.MethodType(forward, model)
    model._fusedrl_patched = True
    return model


def token_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, shift: bool = True, **model_kwargs):
    """Per-token log-probs (and entropies) of `labels` under `model`, for RL trainers.

    Runs the model's backbone and the fused LM head; works on patched and unpatched models.

    Args:
        input_ids: (B, T) token ids; model_kwargs: attention_mask, position_ids, ... for the backbone.
        labels: (B, T) ids to score, -100 where not scored.
        shift: True (default) scores labels[:, t + 1] from position t, as a causal LM loss does,
            giving (B, T - 1); False scores labels[:, t] from position t, giving (B, T).
        temperature: logits are divided by it (the sampling temperature).
    Returns:
        logp (B, T - 1 | T) float32, 0 at -100 labels; and entropy of the same shape when
        `return_entropy`. Differentiable w.r.t. the model's parameters.
    """
    check_supported(model)
    _, hidden = _backbone_hidden(model, (), dict(model_kwargs, input_ids=input_ids))
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    outputs = ("log_probs", "entropy") if return_entropy else ("log_probs",)
    logp, ent, _, _, _ = head_logprobs(model, hidden, labels, temperature=temperature, outputs=outputs)
    return (logp, ent) if return_entropy else logp
