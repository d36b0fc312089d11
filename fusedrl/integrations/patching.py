"""`apply_fusedrl(model)` for a loaded model, `apply_fusedrl_to_<family>()` before loading.

    from fusedrl.integrations import apply_fusedrl
    model = AutoModelForCausalLM.from_pretrained(name)
    apply_fusedrl(model)                        # fused log-prob loss + attn_implementation "fusedrl"

    from fusedrl.integrations import apply_fusedrl_to_qwen2
    apply_fusedrl_to_qwen2()                    # every Qwen2ForCausalLM built from now on is patched
    model = AutoModelForCausalLM.from_pretrained(name)

The class-level functions wrap the family's `*ForCausalLM.__init__` so each new instance
gets `apply_fusedrl(instance, ...)`; `revert_fusedrl_patches()` restores the classes.
"""
from __future__ import annotations

import functools
import importlib
from typing import Dict, Tuple

from .attention import ATTN_IMPLEMENTATION, register_attention
from .hf import patch_causal_lm

FAMILIES: Dict[str, Tuple[str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaForCausalLM"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM"),
    "gemma": ("transformers.models.gemma.modeling_gemma", "GemmaForCausalLM"),
    "gemma2": ("transformers.models.gemma2.modeling_gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("transformers.models.gemma3.modeling_gemma3", "Gemma3ForCausalLM"),
}
_ORIGINAL_INITS: Dict[type, object] = {}


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def apply_fusedrl(model, *, logprobs: bool = True, attention: bool = True):
    """Patch a loaded Hugging Face causal LM instance in place.

    Args:
        model: a `*ForCausalLM` instance (Llama, Qwen2, Qwen3, Mistral, Gemma families; any
            model with a plain linear LM head and transformers' attention interface).
        logprobs: route `model(..., labels=...)` through the fused linear log-probs (no
            logits; `logits` is None in the output) and enable `fused_lm_head=True`
            (per-token log-probs / entropies); see `fusedrl.integrations.hf`.
        attention: register "fusedrl" with transformers' attention interface and switch the
            model to it (padding-free batches run through `varlen_attention`; cached decoding
            falls back to SDPA); see `fusedrl.integrations.attention`.
    Returns:
        the model.
    """
    _check_flag("logprobs", logprobs)
    _check_flag("attention", attention)
    if attention:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        softcap = getattr(config, "attn_logit_softcapping", None)
        if softcap is not None:
            raise ValueError(f"{type(model).__name__} soft-caps its attention logits (attn_logit_softcapping="
                             f"{softcap}), which the fused attention does not: use apply_fusedrl(model, attention=False)")
    if logprobs:
        patch_causal_lm(model)
    if attention:
        register_attention()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def apply_fusedrl_to_family(family: str, *, logprobs: bool = True, attention: bool = True) -> type:
    """Patch the family's `*ForCausalLM` class: instances built afterwards are patched.

    Args:
        family: one of `FAMILIES` ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3").
    Returns:
        the patched class. Calling again replaces the options.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    _check_flag("logprobs", logprobs)
    _check_flag("attention", attention)
    module_name, class_name = FAMILIES[family]
    cls = getattr(importlib.import_module(module_name), class_name)
    original = _ORIGINAL_INITS.setdefault(cls, cls.__init__)
    if attention:
        register_attention()

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is cls:  # a subclass with its own head is not ours to patch
            apply_fusedrl(self, logprobs=logprobs, attention=attention)

    cls.__init__ = __init__
    return cls


def revert_fusedrl_patches() -> None:
    """Restore every class patched by `apply_fusedrl_to_*` (instances already built stay patched)."""
    for cls, original in _ORIGINAL_INITS.items():
        cls.__init__ = original
    _ORIGINAL_INITS.clear()


def apply_fusedrl_to_llama(*, logprobs: bool = True, attention: bool = True) -> type:
    """Patch `LlamaForCausalLM` before loading (see `apply_fusedrl_to_family`)."""
    return apply_fusedrl_to_family("llama", logprobs=logprobs, attention=attention)


def apply_fusedrl_to_qwen2(*, logprobs: bool = True, attention: bool = True) -> type:
    """Patch `Qwen2ForCausalLM` before loading (see `apply_fusedrl_to_family`)."""
    return apply_fusedrl_to_family("qwen2", logprobs=logprobs, attention=attention)


def apply_fusedrl_to_qwen3(*, logprobs: bool = True, attention: bool = True) -> type:
    """Patch `Qwen3ForCausalLM` before loading (see `apply_fusedrl_to_family`)."""
    return apply_fusedrl_to_family("qwen3", logprobs=logprobs, attention=attention)


def apply_fusedrl_to_mistral(*, logprobs: bool = True, attention: bool = True) -> type:
    """Patch `MistralForCausalLM` before loading (see `apply_fusedrl_to_family`)."""
    return apply_fusedrl_to_family("mistral", logprobs=logprobs, attention=attention)


def apply_fusedrl_to_gemma(*, logprobs: bool = True, attention: bool = True) -> type:
    """Patch `GemmaForCausalLM` before loading (see `apply_fusedrl_to_family`)."""
    return apply_fusedrl_to_family("gemma", logprobs=logprobs, attention=attention)


def apply_fusedrl_to_gemma2(*, logprobs: bool = True, attention: bool = True) -> type:
    """Patch `Gemma2ForCausalLM` (soft-capped logits: only with final_logit_softcapping=None
    or logprobs=False) before loading (see `apply_fusedrl_to_family`)."""
    return apply_fusedrl_to_family("gemma2", logprobs=logprobs, attention=attention)


def apply_fusedrl_to_gemma3(*, logprobs: bool = True, attention: bool = True) -> type:
    """Patch `Gemma3ForCausalLM` (text) before loading (see `apply_fusedrl_to_family`)."""
    return apply_fusedrl_to_family("gemma3", logprobs=logprobs, attention=attention)
