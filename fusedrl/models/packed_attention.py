"""Run stock transformers causal LMs on packed batches through `varlen_attention`.

A packed batch is one row of `total` tokens holding several documents back to
back. Document boundaries come from `cu_seqlens` (int32, `(num_seqs + 1,)`),
passed explicitly to every attention layer through transformers' attention
kwargs (`cu_seq_lens_q/k`, `max_length_q/k`, the names its flash-attention
path uses); they are never inferred from position ids. Position ids restart
at 0 in each document so RoPE sees per-document positions, but a batch whose
position ids do not restart is still isolated correctly by `cu_seqlens`.

Usage:

    from fusedrl.models.packed_attention import packed_forward
    hidden = packed_forward(model, input_ids, position_ids, cu_seqlens, max_seqlen)  # (total, H)

or, by hand:

    name = register_varlen_attention()
    model.set_attn_implementation(name)
    out = model.model(input_ids[None], position_ids=position_ids[None],
                      attention_mask=torch.ones_like(input_ids[None], dtype=torch.bool),
                      **packed_attention_kwargs(cu_seqlens, max_seqlen))

Works for models that route attention through `AttentionInterface` (Llama,
Qwen2, Qwen3, Mistral, Gemma, Phi3, ...). Sliding-window layers
(`sliding_window=w` from the model) become `window=(w - 1, w - 1)`, as in
transformers' flash-attention path (with causal masking the right bound is moot).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fusedrl.kernels import varlen_attention
from fusedrl.kernels.invariant import is_invariant

ATTN_IMPLEMENTATION = "fusedrl_varlen"


def _varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> Optional[torch.Tensor]:
    """Mask builder registered beside the attention: never builds a (T, T) mask.

    Returns the 2-D padding mask `(B, kv_length)` as given (or None); masking
    inside a document is done by the kernel, across documents by `cu_seqlens`.
    No `.all()` check here, to keep the model forward free of host syncs.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask[:, -kv_length:]
    return attention_mask


def _rows_as_documents(
    attention_mask: Optional[torch.Tensor], batch: int, length: int, device: torch.device
) -> Tuple[torch.Tensor, int, Optional[torch.Tensor]]:
    """Fallback boundaries for a plain (unpacked) call: one document per row.

    Returns (cu_seqlens, max_seqlen, token_index): token_index is None when every
    row is full, else the flat indices of the kept tokens of a 2-D padding mask
    (this path syncs with the host: it is the slow, compatibility path).
    """
    if attention_mask is None:
        cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device) * length
        return cu_seqlens, length, None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"{ATTN_IMPLEMENTATION}: without cu_seq_lens_q the attention_mask must be a 2-D padding mask "
            f"of shape {(batch, length)}, got {tuple(attention_mask.shape)}; pass packed_attention_kwargs(...)"
        )
    keep = attention_mask.to(torch.bool)
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    token_index = keep.flatten().nonzero().squeeze(1)
    return cu_seqlens, int(seqlens.max()), token_index


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    cu_seq_lens_k: Optional[torch.Tensor] = None,
    max_length_q: Optional[int] = None,
    max_length_k: Optional[int] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """The function registered as attn implementation "fusedrl_varlen".

    Args:
        module: the calling attention layer (read for `is_causal`).
        query: (B, Hq, T, D); key/value: (B, Hkv, T, D). With `cu_seq_lens_q`, B must be 1
            (a packed row) or the tokens of all rows are treated as one packed stream.
        attention_mask: ignored when `cu_seq_lens_q` is given (a packed row has no padding);
            otherwise a 2-D padding mask (B, T) or None (one document per row).
        scaling, sliding_window, is_causal: forwarded as softmax_scale / window / causal.
        cu_seq_lens_q/k: int32 (num_seqs + 1,) document boundaries (must be equal: no KV cache).
        max_length_q/k: longest document, a host int.

    Returns:
        ((B, T, Hq, D) attention output, None) -- transformers' layout.
    """
    if dropout:
        raise ValueError(f"{ATTN_IMPLEMENTATION} does not support attention dropout, got dropout={dropout}")
    if softcap is not None:
        raise ValueError(f"{ATTN_IMPLEMENTATION} does not support logit softcapping, got softcap={softcap}")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{ATTN_IMPLEMENTATION} does not support attention sinks (s_aux)")
    batch, num_heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    cached = kv_len != q_len or (attention_mask is not None and attention_mask.dim() == 4)
    if cu_seq_lens_q is None and cached:  # cached generation (fusedrl.rollout.hf): padded rows, a KV cache
        return _cached_attention(module, query, key, value, attention_mask, scaling=scaling,
                                 sliding_window=sliding_window)
    if kv_len != q_len:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION} needs key length == query length for packed rows (no KV cache), got "
            f"query length {q_len} and key length {kv_len}"
        )
    if cu_seq_lens_k is not None and (cu_seq_lens_q is None or cu_seq_lens_k.shape != cu_seq_lens_q.shape):
        # Separate key boundaries would mean cross-attention or a KV cache: not supported here.
        raise ValueError(f"{ATTN_IMPLEMENTATION}: cu_seq_lens_k must equal cu_seq_lens_q (self-attention)")

    token_index = None
    if cu_seq_lens_q is not None:
        cu_seqlens = cu_seq_lens_q
        if max_length_q is None:
            raise ValueError(f"{ATTN_IMPLEMENTATION}: cu_seq_lens_q was given without max_length_q")
        max_seqlen = max_length_q
    else:
        cu_seqlens, max_seqlen, token_index = _rows_as_documents(attention_mask, batch, q_len, query.device)

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = None if sliding_window is None else (sliding_window - 1, sliding_window - 1)

    # (B, H, T, D) -> (B * T, H, D): the varlen layout, documents back to back.
    q = query.transpose(1, 2).reshape(batch * q_len, num_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * q_len, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * q_len, value.shape[1], value.shape[-1])
    if token_index is not None:
        q, k, v = q[token_index], k[token_index], v[token_index]
    out = varlen_attention(
        q, k, v, cu_seqlens, int(max_seqlen), causal=causal, softmax_scale=scaling, window=window
    )
    if token_index is not None:
        full = out.new_zeros(batch * q_len, num_heads, out.shape[-1])
        out = full.index_copy(0, token_index, out)
    return out.reshape(batch, q_len, num_heads, out.shape[-1]), None


def _cached_attention(module, query, key, value, attention_mask, *, scaling, sliding_window):
    """Padded rows with a KV cache (generation): transformers' SDPA attention with an explicit mask.

    A 4-D additive mask is used as given; a 2-D padding mask (B, kv_len) or None becomes the
    causal (and sliding-window) mask of the last q_len positions, so the model keeps its
    attention implementation during generation. A query with no key left (a left-pad slot)
    attends to itself, so no row is empty (an empty row would give NaN).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or attention_mask.dim() == 2:
        q_len, kv_len = query.shape[2], key.shape[2]
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]  # (q, 1)
        k_pos = torch.arange(kv_len, device=query.device)[None, :]  # (1, kv)
        allowed = (k_pos <= q_pos)[None, None]  # (1, 1, q, kv)
        if sliding_window is not None:
            allowed = allowed & (k_pos > q_pos - sliding_window)[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
        allowed = allowed | (k_pos == q_pos)[None, None]
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        attention_mask = torch.where(allowed, zero, torch.full_like(zero, torch.finfo(query.dtype).min))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)


def register_varlen_attention() -> str:
    """Register "fusedrl_varlen" with transformers' attention and mask interfaces (idempotent).

    Returns:
        The implementation name, for `from_pretrained(attn_implementation=...)` or
        `model.set_attn_implementation(...)`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _varlen_mask)
    return ATTN_IMPLEMENTATION


def packed_attention_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """Keyword arguments for `model(...)` that carry the document boundaries to every layer.

    Args:
        cu_seqlens: int32 (num_seqs + 1,) boundaries, on the model's device.
        max_seqlen: longest document, a host int.

    Returns:
        {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"} -- the names
        transformers routes to attention functions (also understood by its FA2 path).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be a host int, got {type(max_seqlen).__name__}")
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen,
    }


def _as_row(name: str, value: torch.Tensor) -> torch.Tensor:
    """(total,) or (1, total) -> (1, total)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() == 1:
        return value.unsqueeze(0)
    if value.dim() == 2 and value.shape[0] == 1:
        return value
    raise ValueError(f"{name} must have shape (total,) or (1, total), got {tuple(value.shape)}")


def packed_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    **kw,
) -> torch.Tensor:
    """Final hidden states of a transformers causal LM on one packed batch (LM head NOT applied).

    Switches the model to "fusedrl_varlen" (registering it first) and leaves it
    there, so that activation-checkpoint recomputation in backward runs the same
    attention; cached generation runs on it too (padded rows with a KV cache go to
    transformers' SDPA attention inside it), so nothing switches back and forth.

    Args:
        model: an `AutoModelForCausalLM` (its base model is used) or the base model itself.
        input_ids: (total,) or (1, total) int64 tokens of all documents back to back.
        position_ids: same shape, restarting at 0 in each document (for RoPE only).
        cu_seqlens: int32 (num_seqs + 1,) boundaries with cu_seqlens[-1] == total.
        max_seqlen: longest document, a host int.
        **kw: extra keyword arguments for the base model's forward.

    Returns:
        (total, hidden_size) final hidden states (after the final norm), in the model's dtype.
    """
    input_ids = _as_row("input_ids", input_ids)
    position_ids = _as_row("position_ids", position_ids)
    if position_ids.shape != input_ids.shape:
        raise ValueError(
            f"position_ids must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(position_ids.shape)}"
        )
    attn_kwargs = packed_attention_kwargs(cu_seqlens, max_seqlen)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if is_invariant():  # fixed-tile forward shared with the native rollout engine (models/invariant_decoder.py)
        from fusedrl.models.invariant_decoder import invariant_packed_hidden

        return invariant_packed_hidden(model, input_ids[0], position_ids[0], cu_seqlens, max_seqlen)
    name = register_varlen_attention()
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)
    base = getattr(model, "base_model", model)
    # A 2-D all-ones mask (cheap, (1, total)) keeps transformers from scanning
    # position ids for packed sequences, which would cost a host sync per forward.
    ones = torch.ones_like(input_ids, dtype=torch.bool)
    kw.setdefault("use_cache", False)
    out = base(input_ids=input_ids, position_ids=position_ids, attention_mask=ones, **attn_kwargs, **kw)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.squeeze(0)
