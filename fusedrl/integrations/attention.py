"""`attn_implementation="fusedrl"`: transformers attention through fusedrl's `varlen_attention`.

Document boundaries, in this order of precedence:

1. `cu_seq_lens_q` / `max_length_q` attention kwargs (what `DataCollatorWithFlattening(
   return_flash_attn_kwargs=True)` passes, and what fusedrl's own engine passes);
2. **position ids that restart at 0**, when there is no 2-D attention mask: a padding-free
   batch (one row of several documents back to back, as transformers'
   `DataCollatorWithFlattening` and TRL's `padding_free=True` produce) carries its boundaries
   only there. `cu_seqlens` is every index where `position_ids == 0`, plus the total, which is
   how transformers' own flash-attention path reads such batches. Reading it costs one host
   sync per forward (the longest document sizes the kernel grid), as in transformers;
3. a 2-D padding mask (B, T): each row's kept tokens are one document (left or right padding);
4. no mask: each row is one document.

Calls the kernel cannot serve fall back to transformers' SDPA with the mask SDPA expects:
cached decoding (query length != key length, i.e. `generate` after the prefill), attention
dropout in training, attention sinks, and 4-D masks. So a model switched to "fusedrl" still
generates. Attention-logit soft-capping (Gemma 2) has no SDPA form either: it raises
ValueError (`apply_fusedrl` refuses such a model up front).
"""
from __future__ import annotations

from typing import Optional

import torch

from fusedrl.kernels import varlen_attention

ATTN_IMPLEMENTATION = "fusedrl"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor):
    """(cu_seqlens int32 (D + 1,), max_seqlen int) of a packed row whose positions restart at 0.

    Args:
        position_ids: (1, T) or (T,) int positions; every document starts at 0.
    Raises:
        ValueError: when the row does not start at position 0 (not a padding-free batch).
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1).to(torch.int32)
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("position_ids of a padding-free batch must start at 0 for every document, "
                         f"got first positions {flat[:8].tolist()}")
    total = torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)
    cu_seqlens = torch.cat([starts, total])
    return cu_seqlens, int(cu_seqlens.diff().max())


def _packed_row(position_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], batch: int) -> bool:
    if position_ids is None or attention_mask is not None or batch != 1:
        return False
    flat = position_ids.reshape(-1)
    return flat.numel() > 1 and bool((flat[1:] == 0).any())


def _rows(attention_mask: Optional[torch.Tensor], batch: int, length: int, device: torch.device):
    """(cu_seqlens, max_seqlen, kept-token index or None) with each row one document."""
    if attention_mask is None:
        return torch.arange(batch + 1, dtype=torch.int32, device=device) * length, length, None
    keep = attention_mask.to(torch.bool)
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    return cu_seqlens, max(int(seqlens.max()), 1), keep.flatten().nonzero().squeeze(1)


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def fusedrl_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                              scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                              softcap: Optional[float] = None, **kwargs):
    """The function registered as "fusedrl" (transformers' attention-interface signature).

    Args:
        query: (B, Hq, T, D); key/value: (B, Hkv, S, D). attention_mask: None or (B, S) (or 4-D:
            SDPA fallback). kwargs: `cu_seq_lens_q`, `max_length_q`, `position_ids`, `is_causal`.
    Returns:
        ((B, T, Hq, D) output, None).
    """
    if softcap is not None:
        raise ValueError(f"attn_implementation {ATTN_IMPLEMENTATION!r} does not support attention logit soft-capping "
                         f"(softcap={softcap}); keep 'eager' for this model")
    batch, num_heads, q_len, head_dim = query.shape
    mask_2d = attention_mask if attention_mask is None or attention_mask.dim() == 2 else None
    if (key.shape[2] != q_len or (dropout and module.training)
            or kwargs.get("s_aux") is not None or (attention_mask is not None and mask_2d is None)):
        mask = attention_mask if mask_2d is None else None
        return _sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                     sliding_window=sliding_window, **kwargs)
    cu_seqlens, token_index = kwargs.get("cu_seq_lens_q"), None
    if cu_seqlens is not None:
        max_seqlen = kwargs.get("max_length_q")
        max_seqlen = int(max_seqlen) if max_seqlen is not None else int(cu_seqlens.diff().max())
    elif _packed_row(kwargs.get("position_ids"), mask_2d, batch):
        cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(kwargs["position_ids"])
    else:
        cu_seqlens, max_seqlen, token_index = _rows(mask_2d, batch, q_len, query.device)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    window = None if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    q = query.transpose(1, 2).reshape(batch * q_len, num_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * q_len, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * q_len, value.shape[1], value.shape[-1])
    if token_index is not None:
        q, k, v = q[token_index], k[token_index], v[token_index]
    out = varlen_attention(q, k, v, cu_seqlens.to(torch.int32), max_seqlen, causal=causal, softmax_scale=scaling,
                           window=window)
    if token_index is not None:
        out = out.new_zeros(batch * q_len, num_heads, out.shape[-1]).index_copy(0, token_index, out)
    return out.reshape(batch, q_len, num_heads, out.shape[-1]), None


def _fusedrl_mask(batch_size: int, q_length: int, kv_length: int, *args, attention_mask=None, **kwargs):
    """Mask builder beside the attention: the 2-D padding mask (or None) for the kernel path;
    the SDPA mask where the attention falls back to SDPA (cached decoding)."""
    if q_length != kv_length or (attention_mask is not None and attention_mask.dim() != 2):
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask, **kwargs)
    if attention_mask is not None:
        return attention_mask[:, -kv_length:]
    return None


def register_attention() -> str:
    """Register "fusedrl" with transformers' attention and mask interfaces (idempotent).

    Returns:
        "fusedrl", for `from_pretrained(..., attn_implementation="fusedrl")` or
        `model.set_attn_implementation("fusedrl")`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, fusedrl_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _fusedrl_mask)
    return ATTN_IMPLEMENTATION
