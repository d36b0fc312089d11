"""The native engine's forward for Llama-style decoders, on the HF model's own parameters (no copy).

Families: llama, qwen2 (q/k/v bias), qwen3 (per-head q/k RMSNorm), mistral. Every weight is read
from the HF modules at call time, so an optimizer step on the policy is seen by the next forward.
Tokens of one step are packed: the first `num_decode` are decode tokens (one per sequence, attended
over the paged cache by `paged_decode_attention`), the rest are prefill chunks (packed
`varlen_attention`; a chunk whose sequence already has cached keys attends over them too).
Other families, other RoPE types or a sliding window shorter than a request raise
`UnsupportedModelError` (a NotImplementedError), which a caller turns into a fallback to `hf`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from ...kernels import varlen_attention
from ...kernels.decode_attention import paged_decode_attention
from ...kernels.invariant import is_invariant
from ...kernels.invariant_attention import attend_planned, attention_plan, paged_slots
from .cascade import CascadeInputs, cascade_decode_attention

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


class UnsupportedModelError(NotImplementedError):
    """The native engine cannot run this model; use the `hf` rollout backend instead."""


@dataclass
class AttentionInputs:
    """How the packed tokens of one step attend (built by the model runner).

    slot_mapping: (N,) int64 cache slot (page * block_size + offset) each token's K/V is written to.
    num_decode: the first num_decode tokens are decode tokens, with block_tables (num_decode, W) and
        context_lens (num_decode,) (keys including the token itself).
    cu_seqlens_q / max_seqlen_q: the prefill chunks' boundaries among the remaining tokens.
    Prefill chunks with cached keys (chunked prefill): context_slots (Nk,) the slots of every key of
    every chunk's sequence, cu_seqlens_k / max_seqlen_k their boundaries, query_index (Nq,) where each
    chunk token sits in that packing. None when no chunk has cached keys.
    cascade: when set, the decode rows attend with `cascade_decode_attention` (shared prompt pages once
    per group) instead of `paged_decode_attention`.
    """

    slot_mapping: torch.Tensor
    num_decode: int = 0
    block_tables: Optional[torch.Tensor] = None
    context_lens: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    context_slots: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_k: int = 0
    query_index: Optional[torch.Tensor] = None
    cascade: Optional[CascadeInputs] = None  # decode rows sharing a group's prompt pages (CPU; cascade.py)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(f"native rollout engine: RoPE type {rope_type!r} is not supported (only "
                                    "'default'); use the hf rollout backend")
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise UnsupportedModelError("native rollout engine: partial_rotary_factor != 1 is not supported")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UnsupportedModelError("native rollout engine: the config names no rope_theta")
    return float(theta)


def _sliding_window(config) -> Optional[int]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if window is None:
        return None
    if config.model_type == "mistral" or any("sliding" in str(t) for t in layer_types):
        return int(window)
    return None


def _check_structure(hf_model) -> None:
    """The modules the forward reads must be the plain ones (no LoRA / quantised / wrapped linears)."""
    decoder = getattr(hf_model, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "embed_tokens"):
        raise UnsupportedModelError("native rollout engine: expected a transformers *ForCausalLM with .model.layers "
                                    f"and .model.embed_tokens, got {type(hf_model).__name__}")
    for i, layer in enumerate(decoder.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if type(getattr(layer.self_attn, name, None)) is not torch.nn.Linear:
                raise UnsupportedModelError(f"native rollout engine: layers[{i}].self_attn.{name} is not a plain "
                                            "nn.Linear (adapters / quantisation are not supported)")
        for name in ("gate_proj", "up_proj", "down_proj"):
            if type(getattr(layer.mlp, name, None)) is not torch.nn.Linear:
                raise UnsupportedModelError(f"native rollout engine: layers[{i}].mlp.{name} is not a plain nn.Linear")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalise in float32, cast back, scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin on the two halves (cos/sin of one half: the same values)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class NativeCausalLM:
    """A functional forward over an HF causal LM's modules (Llama / Qwen2 / Qwen3 / Mistral)."""

    def __init__(self, hf_model, decode_backend: Optional[str] = None):
        config = hf_model.config
        family = getattr(config, "model_type", None)
        if family not in FAMILIES:
            raise UnsupportedModelError(f"native rollout engine: model family {family!r} is not supported "
                                        f"(supported: {', '.join(FAMILIES)}); use the hf rollout backend")
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"native rollout engine: hidden_act {act!r} is not supported (silu only)")
        _check_structure(hf_model)
        self.hf = hf_model
        self.config = config
        self.family = family
        self.decoder = hf_model.model
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.sliding_window = _sliding_window(config)
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.decode_backend = decode_backend
        theta = _rope_theta(config)
        self._inv_freq_cpu = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        self._inv_freq = {}

    @property
    def param(self) -> torch.Tensor:
        return self.decoder.embed_tokens.weight

    @property
    def vocab_size(self) -> int:
        return self.hf.get_output_embeddings().weight.shape[0]

    def check_length(self, total: int) -> None:
        """Refuse a sequence the engine cannot attend to exactly (window or position limit)."""
        if self.sliding_window is not None and total > self.sliding_window:
            raise UnsupportedModelError(f"native rollout engine: a sequence of {total} tokens exceeds the model's "
                                        f"sliding window {self.sliding_window}, which the engine does not implement")

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        inv = self._inv_freq.get(positions.device)
        if inv is None:
            inv = self._inv_freq[positions.device] = self._inv_freq_cpu.to(positions.device)
        freqs = positions[:, None].float() * inv[None, :]
        return freqs.cos().to(dtype)[:, None, :], freqs.sin().to(dtype)[:, None, :]

    def _attention(self, layer, h, cos, sin, attn: AttentionInputs, k_cache, v_cache):
        sa = layer.self_attn
        n = h.shape[0]
        q = F.linear(h, sa.q_proj.weight, sa.q_proj.bias).view(n, self.num_heads, self.head_dim)
        k = F.linear(h, sa.k_proj.weight, sa.k_proj.bias).view(n, self.num_kv_heads, self.head_dim)
        v = F.linear(h, sa.v_proj.weight, sa.v_proj.bias).view(n, self.num_kv_heads, self.head_dim)
        if self.family == "qwen3":
            q = rms_norm(q, sa.q_norm.weight, sa.q_norm.variance_epsilon)
            k = rms_norm(k, sa.k_norm.weight, sa.k_norm.variance_epsilon)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_k.index_copy_(0, attn.slot_mapping, k.to(k_cache.dtype))
        flat_v.index_copy_(0, attn.slot_mapping, v.to(v_cache.dtype))
        parts: List[torch.Tensor] = []
        nd = attn.num_decode
        if nd and attn.cascade is not None:
            parts.append(cascade_decode_attention(q[:nd], k_cache, v_cache, attn.cascade, attn.context_lens,
                                                  self.scale))
        elif nd:
            parts.append(paged_decode_attention(q[:nd], k_cache, v_cache, attn.block_tables, attn.context_lens,
                                                softmax_scale=self.scale, backend=self.decode_backend))
        if n > nd:
            parts.append(self._prefill_attention(q[nd:], k[nd:], v[nd:], attn, flat_k, flat_v))
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        return F.linear(o.reshape(n, -1), sa.o_proj.weight, sa.o_proj.bias)

    def _prefill_attention(self, q, k, v, attn: AttentionInputs, flat_k, flat_v):
        if attn.context_slots is None:
            return varlen_attention(q, k, v, attn.cu_seqlens_q, attn.max_seqlen_q, causal=True,
                                    softmax_scale=self.scale)
        # Chunks continuing a cached sequence: attend over every cached key; the query rows of the
        # cached positions are zeros whose outputs are dropped (causal masking keeps the rest exact).
        keys, values = flat_k.index_select(0, attn.context_slots), flat_v.index_select(0, attn.context_slots)
        queries = q.new_zeros(keys.shape[0], self.num_heads, self.head_dim)
        queries[attn.query_index] = q
        out = varlen_attention(queries, keys, values, attn.cu_seqlens_k, attn.max_seqlen_k, causal=True,
                               softmax_scale=self.scale)
        return out[attn.query_index]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs, kv_caches) -> torch.Tensor:
        """Final-norm hidden states (N, H) of the packed tokens; writes their K/V into `kv_caches`."""
        if is_invariant():
            return self._forward_invariant(input_ids, positions, attn, kv_caches)
        x = F.embedding(input_ids, self.decoder.embed_tokens.weight)
        cos, sin = self._rope(positions, x.dtype)
        for layer, (k_cache, v_cache) in zip(self.decoder.layers, kv_caches):
            h = rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            x = x + self._attention(layer, h, cos, sin, attn, k_cache, v_cache)
            h = rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            mlp = layer.mlp
            gate = F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)
            up = F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias)
            x = x + F.linear(F.silu(gate, inplace=True).mul_(up), mlp.down_proj.weight, mlp.down_proj.bias)
        norm = self.decoder.norm
        return rms_norm(x, norm.weight, norm.variance_epsilon)

    def _forward_invariant(self, input_ids, positions, attn: AttentionInputs, kv_caches) -> torch.Tensor:
        """Invariant mode: the trainer's fixed-tile layers (`models.invariant_decoder.run_layers`), attention
        over the paged cache with the trainer's tile order (`attend_sequences`: all decoding sequences in one
        batch, all prefill chunks in another)."""
        from ...models.invariant_decoder import decoder_spec, run_layers

        spec = decoder_spec(self.config)
        nd = attn.num_decode
        if nd:  # one query per sequence at position len - 1, its keys read from the paged cache
            lens = attn.context_lens.long()
            decode_slots = paged_slots(attn.block_tables, lens, kv_caches[0][0].shape[1])  # (pages, bs, Hkv, D)
            decode_plan = attention_plan(torch.arange(nd + 1), torch.cat([lens.new_zeros(1), lens.cumsum(0)]),
                                         lens - 1, input_ids.device, key_rows=decode_slots)
        if input_ids.shape[0] > nd:
            cu_q = attn.cu_seqlens_q.tolist()
            if attn.context_slots is None:  # whole prompts: their own keys from position 0
                cu_k, starts = cu_q, [0] * (len(cu_q) - 1)
            else:  # chunks continuing a cached sequence: every cached key, the chunk at the end
                cu_k = attn.cu_seqlens_k.tolist()
                starts = [(k1 - k0) - (q1 - q0) for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:])]
            prefill_plan = attention_plan(cu_q, cu_k, starts, input_ids.device,
                                          key_rows=None if attn.context_slots is None else attn.context_slots.long())

        def attend(index, q, k, v):  # one batched call for the decode rows, one for the prefill chunks
            k_cache, v_cache = kv_caches[index]
            flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
            flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
            flat_k.index_copy_(0, attn.slot_mapping, k.to(k_cache.dtype))
            flat_v.index_copy_(0, attn.slot_mapping, v.to(v_cache.dtype))
            outs = []
            if nd:  # the plan's key_rows: the cache read in place (Triton) or gathered (PyTorch path)
                outs.append(attend_planned(q[:nd], flat_k, flat_v, decode_plan, spec.scale))
            if q.shape[0] > nd:  # whole prompts: their own keys; chunks: the cache, through the plan's key_rows
                keys, values = (k[nd:], v[nd:]) if attn.context_slots is None else (flat_k, flat_v)
                outs.append(attend_planned(q[nd:], keys, values, prefill_plan, spec.scale))
            return torch.cat(outs)

        return run_layers(spec, self.decoder, input_ids, positions, attend)

    @torch.no_grad()
    def sample_invariant(self, hidden: torch.Tensor, sampler, streams: torch.Tensor, steps: torch.Tensor):
        """Invariant mode: (tokens, log-probs, top) of hidden rows (R, H), the tokens drawn by `sampler`,
        the log-probs the trainer's `linear_logprobs` of them to the bit (its fixed-tile path; on the
        PyTorch path from the same LM-head matmul the sampler drew from: `sample_with_logprobs`)."""
        from ...kernels.logprobs import sample_with_logprobs

        head = self.hf.get_output_embeddings()

        def choose(logits):
            tokens, _, top = sampler(logits, streams, steps)
            return tokens, top

        return sample_with_logprobs(hidden, head.weight, getattr(head, "bias", None), sampler.temperature, choose)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, V) float32 logits of the given hidden rows (tied embeddings: the HF head is the embedding)."""
        head = self.hf.get_output_embeddings()
        return F.linear(hidden, head.weight, getattr(head, "bias", None)).float()
