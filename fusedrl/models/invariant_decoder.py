"""The decoder forward of invariant mode, shared by the trainer and the native rollout engine.

In invariant mode (`fusedrl.kernels.invariant`) the trainer's packed forward (`packed_forward`,
hence `hidden_states` / `token_logprobs`) and the native engine's forward both run `run_layers`
below on the HF model's own parameters: every linear is `invariant_linear`, every RMSNorm
`invariant_rms_norm`, RoPE the same function, attention `attend_sequences` -- bitwise
`attend_sequence` per sequence, all sequences' query tiles in one batch (the trainer over a
document's own keys, the engine over the paged cache). The same primitives with the same tile
shapes on both sides make a token's final hidden state -- and so its log-prob -- bitwise the same
whether the sampler or the trainer computes it, and wherever the token sits in a pack.

Families: llama, qwen2 (q/k/v bias), qwen3 (per-head q/k RMSNorm), mistral; silu MLP, default RoPE,
no sliding window shorter than the sequence. Anything else raises ValueError naming the field.
Activation checkpointing is not applied on this path (the whole forward keeps its activations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fusedrl.kernels.invariant import invariant_linear, invariant_rms_norm
from fusedrl.kernels.invariant_attention import attend_planned, attention_plan

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class DecoderSpec:
    """What the forward needs from a model config."""

    family: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    inv_freq: torch.Tensor  # (head_dim / 2,) float32, on the CPU
    sliding_window: Optional[int]


def decoder_spec(config) -> DecoderSpec:
    """The DecoderSpec of a transformers config; ValueError for a model invariant mode cannot run."""
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"model_type: invariant mode supports {', '.join(FAMILIES)}, got {family!r}")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act: invariant mode supports silu only, got {act!r}")
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default" or getattr(config, "partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise ValueError(f"rope_parameters: invariant mode supports the default full RoPE, got {rope_type!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("rope_theta: the config names none")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if not (family == "mistral" or any("sliding" in str(t) for t in layer_types)):
        window = None
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return DecoderSpec(family, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                       head_dim ** -0.5, inv_freq, None if window is None else int(window))


def rope_cos_sin(spec: DecoderSpec, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin (N, 1, head_dim / 2) of int positions (N,), in `dtype` (elementwise: layout-free)."""
    freqs = positions[:, None].float() * spec.inv_freq.to(positions.device)[None, :]
    return freqs.cos().to(dtype)[:, None, :], freqs.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin, on the two halves."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _linear(module, x):
    return invariant_linear(x, module.weight, module.bias)


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _attention(spec: DecoderSpec, index: int, layer, h, cos, sin, attend: Attend) -> torch.Tensor:
    sa, n = layer.self_attn, h.shape[0]
    q = _linear(sa.q_proj, h).view(n, spec.num_heads, spec.head_dim)
    k = _linear(sa.k_proj, h).view(n, spec.num_kv_heads, spec.head_dim)
    v = _linear(sa.v_proj, h).view(n, spec.num_kv_heads, spec.head_dim)
    if spec.family == "qwen3":
        q = invariant_rms_norm(q, sa.q_norm.weight, sa.q_norm.variance_epsilon)
        k = invariant_rms_norm(k, sa.k_norm.weight, sa.k_norm.variance_epsilon)
    o = attend(index, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # (n, Hq, D)
    return _linear(sa.o_proj, o.reshape(n, -1))


def run_layers(spec: DecoderSpec, decoder, input_ids: torch.Tensor, positions: torch.Tensor,
               attend: Attend) -> torch.Tensor:
    """Final-norm hidden states (N, H) of tokens (N,) at positions (N,); `attend(layer, q, k, v)` -> (N, Hq, D)."""
    x = F.embedding(input_ids, decoder.embed_tokens.weight)
    cos, sin = rope_cos_sin(spec, positions, x.dtype)
    for index, layer in enumerate(decoder.layers):
        norm = layer.input_layernorm
        x = x + _attention(spec, index, layer, invariant_rms_norm(x, norm.weight, norm.variance_epsilon), cos, sin,
                           attend)
        norm, mlp = layer.post_attention_layernorm, layer.mlp
        h = invariant_rms_norm(x, norm.weight, norm.variance_epsilon)
        x = x + _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h))
    return invariant_rms_norm(x, decoder.norm.weight, decoder.norm.variance_epsilon)


def invariant_packed_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int) -> torch.Tensor:
    """The trainer's packed forward in invariant mode (differentiable).

    Args:
        model: a transformers *ForCausalLM (or its decoder) of a supported family.
        input_ids, position_ids: (total,) tokens and per-document positions (restarting at 0).
        cu_seqlens: int32 (num_seqs + 1,) document boundaries; max_seqlen: the longest document.
    Returns:
        (total, hidden_size) final hidden states in the model's dtype.
    """
    spec = decoder_spec(model.config)
    if spec.sliding_window is not None and max_seqlen > spec.sliding_window:
        raise ValueError(f"max_seqlen: {max_seqlen} exceeds the model's sliding window {spec.sliding_window}, "
                         "which invariant mode does not implement")
    decoder = getattr(model, "model", None) if hasattr(model, "lm_head") else model
    if decoder is None or not hasattr(decoder, "layers"):
        raise ValueError(f"model: expected a transformers *ForCausalLM with .model.layers, got {type(model).__name__}")
    plan = attention_plan(cu_seqlens, cu_seqlens, torch.zeros(len(cu_seqlens) - 1, dtype=torch.int64),
                          input_ids.device)  # the same tile layout for every layer

    def attend(index, q, k, v):
        return attend_planned(q, k, v, plan, spec.scale)

    return run_layers(spec, decoder, input_ids, position_ids, attend)
