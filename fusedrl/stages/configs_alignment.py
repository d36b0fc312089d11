"""Config tables of the reward-model, rejection-sampling and direct-alignment stages.

Each table is one small dataclass whose fields are documented by the string
under them (as in `fusedrl.config`). In a run file:

    [run]
    stage = "dpo"
    [dpo]
    loss = "dpo"
    beta = 0.1

`AlignmentTrainConfig` is `TrainConfig` plus these three tables: the root config
class of these stages (`fusedrl.stages.STAGE_CONFIGS`). `check_section`
validates one table with errors that name the key (the stage builders call it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from fusedrl.config import ConfigError, TrainConfig


RM_LOSSES = ("bradley_terry", "margin", "plackett_luce", "outcome")
RM_KINDS = ("sequence", "process")
PRM_HEADS = ("classify", "scalar")
DPO_LOSSES = ("dpo", "cdpo", "ipo", "simpo", "orpo", "kto", "apo_zero", "apo_down", "rpo")
REFERENCE_FREE = ("simpo", "orpo")
SELECTIONS = ("best_per_prompt", "top_k", "random")


@dataclass
class RewardModelConfig:
    loss: str = "bradley_terry"
    """"bradley_terry" (-log sigmoid(r_c - r_r)), "margin" (minus a per-pair margin, Llama 2),
    "plackett_luce" (K-wise ranking) or "outcome" (per-token BCE against a 0/1 label)."""
    margin_key: str = "margin"
    """Record field holding the margin of a pair (loss = "margin")."""
    head_bias: bool = False
    """Give a fresh scalar head a bias (transformers' sequence classifiers have none)."""
    eval_micro_batches: int = 0
    """Micro-batches of data.eval used by the evaluation (0: the whole file)."""
    kind: str = "sequence"
    """"sequence" (one score per sequence: `loss` above) or "process" (a PRM: a head at each step's last
    token of prompt/steps/labels records; see fusedrl.stages.process_reward)."""
    prm_head: str = "classify"
    """kind = "process": "classify" (prm_classes classes) or "scalar" (one logit, binary cross-entropy)."""
    prm_classes: int = 2
    """kind = "process", classify head: 2 (bad, good) or 3 (bad, neutral, good; needs {-1, 0, 1} labels)."""
    step_separator: str = "\n"
    """kind = "process": the text rendered after every step; each step ends at its separator's last token."""
    neutral_as: int = 1
    """kind = "process", 2 classes or scalar head: the class of PRM800K's neutral label 0 (0 bad, 1 good)."""


@dataclass
class RejectionConfig:
    reward_model: Optional[str] = None
    """Folder of a scalar-head reward model that scores the samples (or set `verifier`)."""
    verifier: Optional[str] = None
    """"module:function" scoring fn(prompt, completion, **record_fields) -> float (or set `reward_model`).
    Importing it runs that module's code (configs are code; the resolved file is logged)."""
    num_samples: int = 4
    """Completions sampled per prompt (N)."""
    selection: str = "best_per_prompt"
    """"best_per_prompt" (argmax of each row of R), "top_k" (the k best of all M x N samples),
    or "random" (a random selection of the same size, the baseline to compare with)."""
    top_k: int = 0
    """Samples kept by "top_k" (0: one per prompt, M)."""
    max_new_tokens: int = 64
    """Longest completion sampled."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    top_k_sampling: int = 0
    """Keep the k most likely tokens when sampling (0: off)."""
    sample_batch_size: int = 64
    """Prompts sampled together in one generation call."""
    max_prompts: int = 0
    """Use only the first this many prompts of data.train (0: all)."""
    cache_dir: Optional[str] = None
    """Where samples and scores are cached (JSON, keyed by a hash of the settings, model and prompts);
    None: OUT_DIR/rejection_cache."""


@dataclass
class DPOConfig:
    loss: str = "dpo"
    """"dpo", "cdpo", "ipo", "simpo", "orpo", "kto", "apo_zero", "apo_down" or "rpo" (DPO + NLL)."""
    beta: Optional[float] = None
    """Temperature of the implicit reward; None: the loss's default (0.1; SimPO 2.0)."""
    label_noise: float = 0.1
    """cDPO: assumed share of flipped labels, in [0, 0.5]."""
    gamma: float = 0.5
    """SimPO: target reward margin."""
    lam: float = 0.1
    """ORPO: weight of the odds-ratio term."""
    alpha: float = 1.0
    """RPO (DPO + NLL): weight of the chosen completion's length-normalised NLL."""
    desirable_weight: float = 1.0
    """KTO: weight of desirable examples."""
    undesirable_weight: float = 1.0
    """KTO: weight of undesirable examples."""
    kto_kl: bool = True
    """KTO: estimate the reference point z0 from mismatched (prompt, completion) pairs (else z0 = 0)."""
    reference: Optional[str] = None
    """Reference model (hub id or folder); None: the policy's own weights before training."""
    ref_cache_dir: Optional[str] = None
    """Where reference log-probs are cached (safetensors); None: OUT_DIR/ref_cache."""
    eval_micro_batches: int = 0
    """Micro-batches of data.eval used by the evaluation (0: the whole file)."""


@dataclass
class AlignmentTrainConfig(TrainConfig):
    """TrainConfig plus the [reward_model], [rejection] and [dpo] tables."""

    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


# Allowed values and lower bounds by "section.field" (same shape as config.CHOICES / MINIMUM).
CHOICES = {"reward_model.loss": RM_LOSSES, "rejection.selection": SELECTIONS, "dpo.loss": DPO_LOSSES,
           "reward_model.kind": RM_KINDS, "reward_model.prm_head": PRM_HEADS, "reward_model.prm_classes": (2, 3),
           "reward_model.neutral_as": (0, 1)}
MINIMUM = {"reward_model.eval_micro_batches": 0, "rejection.num_samples": 1, "rejection.top_k": 0,
           "rejection.max_new_tokens": 1, "rejection.sample_batch_size": 1, "rejection.max_prompts": 0,
           "rejection.top_k_sampling": 0, "dpo.label_noise": 0.0, "dpo.gamma": 0.0, "dpo.lam": 0.0,
           "dpo.alpha": 0.0, "dpo.desirable_weight": 0.0, "dpo.undesirable_weight": 0.0,
           "dpo.eval_micro_batches": 0}


def check_section(section, name: str, *, require_scorer: bool = True) -> None:
    """Validate one of these tables; raise ConfigError naming "name.field", the value and what is expected.

    require_scorer: for "rejection", demand exactly one of reward_model / verifier
    (False when the caller passes its own scorer).
    """
    for f in fields(section):
        key, value = f"{name}.{f.name}", getattr(section, f.name)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}", value, f"one of {CHOICES[key]}")
        if key in MINIMUM and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < MINIMUM[key]):
            raise ConfigError(f"{key}", value, f"a number >= {MINIMUM[key]}")
    if name == "dpo":
        if section.beta is not None and (isinstance(section.beta, bool) or not section.beta > 0):
            raise ConfigError("dpo.beta", section.beta, "a number > 0 or None")
        if section.label_noise > 0.5:
            raise ConfigError("dpo.label_noise", section.label_noise, "a value in [0, 0.5]")
    if name == "rejection":
        if require_scorer and (section.reward_model is None) == (section.verifier is None):
            raise ConfigError("rejection.verifier", section.verifier, "exactly one of reward_model and verifier",
                              f"rejection.reward_model / rejection.verifier: set exactly one, got "
                             f"reward_model={section.reward_model!r}, verifier={section.verifier!r}")
        if not section.temperature > 0:
            raise ConfigError("rejection.temperature", section.temperature, "a number > 0")
        if not 0 < section.top_p <= 1:
            raise ConfigError("rejection.top_p", section.top_p, "a value in (0, 1]")
