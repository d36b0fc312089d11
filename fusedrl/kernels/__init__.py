"""Fused ops for RLHF. Imports and works with torch alone (reference path).

Backend selection lives in `fusedrl.kernels._dispatch` (HAS_TRITON, HAS_FLASH_ATTN,
HAS_CSRC, force_backend).
"""
from ._dispatch import HAS_CSRC, HAS_FLASH_ATTN, HAS_TRITON, force_backend, get_backend, set_backend
from .attention import varlen_attention
from .logprobs import linear_logprobs, logprobs_from_logits

__all__ = [
    "HAS_CSRC",
    "HAS_FLASH_ATTN",
    "HAS_TRITON",
    "force_backend",
    "get_backend",
    "set_backend",
    "linear_logprobs",
    "logprobs_from_logits",
    "varlen_attention",
]
