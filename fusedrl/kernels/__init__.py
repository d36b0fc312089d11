"""Fused ops for RLHF. Imports and works with torch alone (reference path).

Backend selection lives in `fusedrl.kernels._dispatch` (HAS_TRITON, HAS_FLASH_ATTN,
force_backend); whether the C++ packing core is built is `fusedrl.packing.HAS_CSRC`.
"""
from ._dispatch import HAS_FLASH_ATTN, HAS_TRITON, force_backend, get_backend, set_backend
from .attention import check_cu_seqlens, varlen_attention
from .decode_attention import paged_decode_attention
from .logprobs import linear_logprobs, logprobs_from_logits
from .kl import KL_KINDS, AdaptiveKLController, kl_penalty
from .advantages import (RunningMeanBaseline, dr_grpo_advantages, fold_kl_into_rewards, gae, grpo_advantages,
                         overlong_reward_shaping, reinforce_advantages, rloo_advantages, whiten)
from .advantages import maxrl_advantages, opo_advantages, passk_advantages, remax_advantages
from .policy_loss import ALGOS, AGGREGATIONS, PolicyLossConfig, policy_loss
from .policy_loss import DUAL_CLIP_DEFAULT
from .losses import (alphapo_loss, aot_loss, bco_pair_loss, cpo_loss, discopop_loss, dpo_norm_loss, exo_pair_loss,
                     hinge_loss, nca_pair_loss, robust_dpo_loss, sequence_logprobs, sppo_hard_loss, wpo_loss,
                     wpo_weights)
from .linear_policy_loss import linear_policy_loss
from .losses import (apo_down_loss, apo_zero_loss, bradley_terry_loss, cdpo_loss, dpo_loss, ipo_loss, kto_loss,
                     orpo_loss, outcome_rm_loss, plackett_luce_loss, rpo_loss, simpo_loss, value_loss)
from .distill import DistillConfig, linear_distill_loss
from .invariant import invariant, invariant_linear, invariant_rms_norm, is_invariant, set_invariant

__all__ = [
    "HAS_FLASH_ATTN",
    "HAS_TRITON",
    "force_backend",
    "get_backend",
    "set_backend",
    "linear_logprobs",
    "logprobs_from_logits",
    "varlen_attention",
    "check_cu_seqlens",
    "paged_decode_attention",
    "KL_KINDS",
    "AdaptiveKLController",
    "kl_penalty",
    "RunningMeanBaseline",
    "dr_grpo_advantages",
    "fold_kl_into_rewards",
    "gae",
    "grpo_advantages",
    "overlong_reward_shaping",
    "reinforce_advantages",
    "rloo_advantages",
    "whiten",
    "maxrl_advantages",
    "opo_advantages",
    "passk_advantages",
    "remax_advantages",
    "DUAL_CLIP_DEFAULT",
    "apo_down_loss",
    "apo_zero_loss",
    "bradley_terry_loss",
    "cdpo_loss",
    "dpo_loss",
    "ipo_loss",
    "kto_loss",
    "orpo_loss",
    "outcome_rm_loss",
    "plackett_luce_loss",
    "rpo_loss",
    "simpo_loss",
    "value_loss",
    "alphapo_loss",
    "aot_loss",
    "bco_pair_loss",
    "cpo_loss",
    "discopop_loss",
    "dpo_norm_loss",
    "exo_pair_loss",
    "hinge_loss",
    "nca_pair_loss",
    "robust_dpo_loss",
    "sequence_logprobs",
    "sppo_hard_loss",
    "wpo_loss",
    "wpo_weights",
    "ALGOS",
    "AGGREGATIONS",
    "PolicyLossConfig",
    "policy_loss",
    "linear_policy_loss",
    "DistillConfig",
    "linear_distill_loss",
    "invariant",
    "invariant_linear",
    "invariant_rms_norm",
    "is_invariant",
    "set_invariant",
]
