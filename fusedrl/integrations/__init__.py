"""Drop-in fused ops for transformers and TRL users (docs/integrations.md).

    from fusedrl.integrations import apply_fusedrl
    apply_fusedrl(model)        # fused log-prob loss (no logits) + attn_implementation="fusedrl"

Imports with torch and transformers only; `fusedrl.integrations.trl` needs `pip install fusedrl[trl]`.
"""
from .attention import ATTN_IMPLEMENTATION, cu_seqlens_from_position_ids, fusedrl_attention_forward, register_attention
from .hf import FusedLogprobsOutput, head_logprobs, patch_causal_lm, token_logprobs
from .modules import (FusedLinearCrossEntropyLoss, FusedLinearDPOLoss, FusedLinearGRPOLoss, FusedLinearLogprobs,
                      FusedPolicyLoss)
from .patching import (FAMILIES, apply_fusedrl, apply_fusedrl_to_family, apply_fusedrl_to_gemma,
                       apply_fusedrl_to_gemma2, apply_fusedrl_to_gemma3, apply_fusedrl_to_llama,
                       apply_fusedrl_to_mistral, apply_fusedrl_to_qwen2, apply_fusedrl_to_qwen3,
                       revert_fusedrl_patches)

__all__ = [
    "ATTN_IMPLEMENTATION", "FAMILIES", "FusedLinearCrossEntropyLoss", "FusedLinearDPOLoss", "FusedLinearGRPOLoss",
    "FusedLinearLogprobs", "FusedLogprobsOutput", "FusedPolicyLoss", "apply_fusedrl", "apply_fusedrl_to_family",
    "apply_fusedrl_to_gemma", "apply_fusedrl_to_gemma2", "apply_fusedrl_to_gemma3", "apply_fusedrl_to_llama",
    "apply_fusedrl_to_mistral", "apply_fusedrl_to_qwen2", "apply_fusedrl_to_qwen3", "cu_seqlens_from_position_ids",
    "fusedrl_attention_forward", "head_logprobs", "patch_causal_lm", "register_attention", "revert_fusedrl_patches",
    "token_logprobs",
]
