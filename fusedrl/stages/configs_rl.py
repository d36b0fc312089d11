"""Config tables of the RL stages: [rollout], [pg] (GRPO and its family, RLOO, REINFORCE), [ppo].

Every field is documented by the string under it (the engine's `describe_config`
reads these). `RLTrainConfig` is `TrainConfig` plus these three tables, so a
TOML file for an RL run is the usual one with them added:

    [run]
    stage = "grpo"            # or dr_grpo, dapo, gspo, cispo, sapo, rloo, reinforce, ppo
    [rollout]
    prompts_per_rollout = 64
    group_size = 8
    max_new_tokens = 512
    verifier = "fusedrl.rollout.rewards:exact_match"
    [pg]
    beta = 0.0

Fields left at None take the algorithm's default (see `ALGORITHMS` in
`fusedrl.stages.policy_gradient`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, Optional

from fusedrl.config import ConfigError, TrainConfig
from fusedrl.kernels import KL_KINDS
from fusedrl.rollout.backends import AVAILABLE_BACKENDS, BACKENDS

KL_IN = ("loss", "reward")
AGGREGATION_CHOICES = ("token_mean", "seq_mean", "seq_mean_fixed_len")


@dataclass
class RolloutConfig:
    prompts_per_rollout: int = 16
    """Prompts drawn from data.train per rollout batch (P)."""
    group_size: int = 4
    """Completions sampled per prompt (G); the group-relative algorithms need G >= 2."""
    max_new_tokens: int = 64
    """Longest completion (L_max); a completion cut here is 'unfinished'."""
    temperature: float = 1.0
    """Sampling temperature tau; the trainer's log-probs are taken at the same tau."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    verifier: Optional[str] = None
    """Reward from a Python function "module:function" called as fn(prompt, completion, **record_fields).
    Importing it runs that module's code (configs are code; the resolved file is logged)."""
    reward_model: Optional[str] = None
    """Reward from a saved scalar-head reward model (folder); used when verifier is None."""
    format_verifier: Optional[str] = None
    """Optional "module:function" format check, added to the reward times format_weight (runs that module's code)."""
    format_weight: float = 1.0
    """Weight of the format verifier's score in the reward."""
    accuracy_verifier: Optional[str] = "fusedrl.rollout.rewards:exact_match"
    """Task accuracy logged per step (and at evaluation) when prompt records carry an `answer`; None disables."""
    token_budget: int = 4096
    """Tokens per packed micro-batch, for training and for the old/reference log-prob and value forwards."""
    eval_prompts: int = 64
    """Prompts of data.eval scored greedily by `evaluate` (0 = all)."""
    backend: str = "native"
    """Sampling backend: "native" (fusedrl's engine: paged KV shared by a group's samples, continuous
    batching; Llama/Qwen2/Qwen3/Mistral, other models fall back to "hf" with a notice) or "hf"
    (transformers with a KV cache, the correctness oracle); both read the trainer's model in place.
    "vllm": vLLM colocated on the trainer's GPU (the `vllm` extra, `pip install fusedrl[vllm]`), asleep
    during training, the policy's weights pushed before each rollout."""
    process_reward_model: Optional[str] = None
    """Reward from a saved process reward model (folder of a `reward_model` run with kind = "process"; the policy's
    tokenizer), added to the verifier / reward model (if any) times prm_weight. GRPO family: one score per
    completion (prm_aggregation of its step scores); PPO: per-token rewards at step ends (s_k - prm_baseline)."""
    prm_aggregation: str = "min"
    """GRPO family: the completion's PRM score from its step scores s_k: "min", "prod" (or "product") or "last"."""
    prm_step_separator: str = "\n"
    """Text that ends a step in a completion (the separator the PRM was trained with)."""
    prm_weight: float = 1.0
    """Weight of the PRM reward in the sum with the verifier / reward model and the format verifier."""
    prm_baseline: float = 0.0
    """PPO: the dense reward at the token ending step k is prm_weight * (s_k - prm_baseline)."""


@dataclass
class PolicyGradientConfig:
    algo: str = "grpo"
    """One of grpo, dr_grpo, dapo, gspo, cispo, sapo, rloo, reinforce (normally set by run.stage)."""
    iterations: int = 1
    """Passes over each rollout batch (GRPO's mu); > 1 recomputes old log-probs at rollout time."""
    mini_batches: int = 1
    """Optimizer steps per pass: the rollout batch is split into this many mini-batches."""
    eps_low: Optional[float] = None
    """Lower clip range (ratio >= 1 - eps_low); None: the algorithm's default."""
    eps_high: Optional[float] = None
    """Upper clip range (ratio <= 1 + eps_high); DAPO's clip-higher is 0.28; None: the algorithm's default."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for negative advantages (clipped algorithms only); None: off."""
    aggregation: Optional[str] = None
    """Loss aggregation: token_mean, seq_mean or seq_mean_fixed_len; None: the algorithm's default."""
    beta: float = 0.0
    """KL coefficient to the frozen reference; 0 loads no reference model."""
    kl_kind: str = "k3"
    """KL estimator: k1, k2, k3 or k3+."""
    kl_in: str = "loss"
    """Where the KL goes: "loss" (per-token penalty) or "reward" (R_i -= beta * sum_t KL_t)."""
    kl_clamp: Optional[float] = None
    """Clamp logp - ref_logp to [-c, c] before the estimator; None: exact."""
    ref_model: Optional[str] = None
    """Reference model folder; None: a frozen copy of the policy at the start of the stage."""
    c_ent: float = 0.0
    """Entropy bonus coefficient."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling cap C when the sampler differs from the learner (vLLM, async); None: off."""
    dynamic_sampling: Optional[bool] = None
    """Drop groups whose rewards are all equal (DAPO); None: the algorithm's default."""
    resample_rounds: int = 2
    """With dynamic sampling: extra rollouts of fresh prompts to refill dropped groups (0: none)."""
    overlong_cache_len: Optional[int] = None
    """DAPO soft overlong punishment window L_cache (0: off); None: the algorithm's default."""
    whiten: bool = False
    """Whiten advantages over the rollout batch (mean 0, std 1 over completion tokens)."""
    adv_eps: float = 1e-4
    """GRPO's epsilon in (R - mean) / (std + eps)."""
    baseline_decay: Optional[float] = None
    """REINFORCE baseline: None = running mean of all rewards, else an EMA with this decay."""
    tau_pos: float = 1.0
    """SAPO gate temperature for positive advantages."""
    tau_neg: float = 1.05
    """SAPO gate temperature for negative advantages."""
    distill_teacher: Optional[str] = None
    """Teacher (folder or hub id, the policy's vocabulary) of the on-policy distillation reward; None: off."""
    distill_coef: float = 0.0
    """Dense distillation reward: advantage_t -= distill_coef * KL_t(policy || teacher) per completion token; 0: off."""


@dataclass
class PPOConfig:
    epochs: int = 2
    """Passes over each rollout batch."""
    mini_batches: int = 2
    """Optimizer steps per pass (the rollout batch split into mini-batches)."""
    eps: float = 0.2
    """Policy clip range [1 - eps, 1 + eps]."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1; None: off."""
    aggregation: str = "token_mean"
    """Loss aggregation: token_mean, seq_mean or seq_mean_fixed_len."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten: bool = True
    """Whiten the GAE advantages over the rollout batch."""
    eps_v: Optional[float] = 0.2
    """Value clipping range around the rollout-time values; None: unclipped."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    value_lr: float = 1e-4
    """Learning rate of the value model's own AdamW (the critic has its own optimizer)."""
    value_model: Optional[str] = None
    """Value model folder; None: initialised from rollout.reward_model when given, else from the policy."""
    beta: float = 0.05
    """KL coefficient to the frozen reference (folded into the per-token reward); 0: no reference model."""
    kl_kind: str = "k1"
    """KL estimator: k1, k2, k3 or k3+."""
    kl_in: str = "reward"
    """"reward" (r_t -= beta * KL_t, PPO style) or "loss"."""
    ref_model: Optional[str] = None
    """Reference model folder; None: a frozen copy of the policy at the start of the stage."""
    c_ent: float = 0.0
    """Entropy bonus coefficient."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling cap when sampler and learner differ; None: off."""
    distill_teacher: Optional[str] = None
    """Teacher (folder or hub id, the policy's vocabulary) of the on-policy distillation reward; None: off."""
    distill_coef: float = 0.0
    """Dense distillation reward: reward_t (before GAE) -= distill_coef * KL_t(policy || teacher) per completion token; 0: off."""


@dataclass
class RLTrainConfig(TrainConfig):
    """TrainConfig plus the RL tables."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    pg: PolicyGradientConfig = field(default_factory=PolicyGradientConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


def _positive_int(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}", value, "an int >= 1")


def _nonneg(key: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{key}", value, "a number >= 0")


def check_rollout(cfg: RolloutConfig, *, require_reward: bool = True) -> None:
    """Validate [rollout] (and, with require_reward, that a reward is named); raise ConfigError naming the key."""
    for key in ("prompts_per_rollout", "group_size", "max_new_tokens", "token_budget"):
        _positive_int(f"rollout.{key}", getattr(cfg, key))
    if not cfg.temperature > 0:
        raise ConfigError("rollout.temperature", cfg.temperature, "a number > 0")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError("rollout.top_p", cfg.top_p, "a number in (0, 1]")
    _nonneg("rollout.top_k", cfg.top_k)
    _nonneg("rollout.eval_prompts", cfg.eval_prompts)
    if cfg.backend not in AVAILABLE_BACKENDS:
        raise ConfigError("rollout.backend", cfg.backend, list(AVAILABLE_BACKENDS),
                          f"rollout.backend: {cfg.backend!r} is not available in this build; expected one of "
                          f"{list(AVAILABLE_BACKENDS)} (known: {list(BACKENDS)})")
    if cfg.backend == "vllm":
        from fusedrl.rollout.vllm import require_vllm

        require_vllm("rollout.backend")
    check_process_reward(cfg)
    if require_reward and cfg.verifier is None and cfg.reward_model is None and cfg.process_reward_model is None:
        raise ConfigError("rollout.verifier", None, "a 'module:function' verifier or rollout.reward_model",
                          "rollout: set rollout.verifier ('module:function'), rollout.reward_model (a folder) or "
                          "rollout.process_reward_model (a folder)")


PRM_AGGREGATIONS = ("min", "prod", "product", "last")


def check_process_reward(cfg: RolloutConfig) -> None:
    """Validate the [rollout] prm_* keys (and that process_reward_model is a PRM folder); ConfigError naming the key."""
    import math
    from pathlib import Path

    if cfg.prm_aggregation not in PRM_AGGREGATIONS:
        raise ConfigError("rollout.prm_aggregation", cfg.prm_aggregation, f"one of {list(PRM_AGGREGATIONS)}")
    if not isinstance(cfg.prm_step_separator, str) or not cfg.prm_step_separator:
        raise ConfigError("rollout.prm_step_separator", cfg.prm_step_separator, "a non-empty string")
    for key in ("prm_weight", "prm_baseline"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"rollout.{key}", value, "a finite number")
    path = cfg.process_reward_model
    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise ConfigError("rollout.process_reward_model", path, "None or a folder")
    config = Path(path) / "config.json"
    if not config.is_file() or '"fusedrl_prm"' not in config.read_text():
        raise ConfigError.message("rollout.process_reward_model", f"rollout.process_reward_model: {path!r} is not a "
                                  "process reward model folder (a config.json with a 'fusedrl_prm' entry, written by "
                                  "a reward_model run with kind = \"process\")")


def check_policy_options(prefix: str, cfg) -> None:
    """Validate the options [pg] and [ppo] share; raise ConfigError naming the key."""
    if cfg.kl_in not in KL_IN:
        raise ConfigError(f"{prefix}.kl_in", cfg.kl_in, f"one of {KL_IN}")
    if cfg.kl_kind not in KL_KINDS:
        raise ConfigError(f"{prefix}.kl_kind", cfg.kl_kind, f"one of {list(KL_KINDS)}")
    _nonneg(f"{prefix}.beta", cfg.beta)
    _nonneg(f"{prefix}.c_ent", cfg.c_ent)
    if cfg.tis_cap is not None and not cfg.tis_cap > 0:
        raise ConfigError(f"{prefix}.tis_cap", cfg.tis_cap, "None or a number > 0")
    if cfg.aggregation is not None and cfg.aggregation not in AGGREGATION_CHOICES:
        raise ConfigError(f"{prefix}.aggregation", cfg.aggregation, f"one of {AGGREGATION_CHOICES}")
    _positive_int(f"{prefix}.mini_batches", cfg.mini_batches)
    if cfg.dual_clip is not None and (isinstance(cfg.dual_clip, bool) or not cfg.dual_clip > 1):
        raise ConfigError(f"{prefix}.dual_clip", cfg.dual_clip, "None or a number > 1 (verl's default is 3)")
    clamp = getattr(cfg, "kl_clamp", None)
    if clamp is not None and not clamp > 0:
        raise ConfigError(f"{prefix}.kl_clamp", clamp, "None or a number > 0")
    _nonneg(f"{prefix}.distill_coef", cfg.distill_coef)
    if cfg.distill_coef and not cfg.distill_teacher:
        raise ConfigError.message(f"{prefix}.distill_teacher", f"{prefix}.distill_teacher: distill_coef > 0 needs a "
                                  "teacher model (a folder or hub id)")


def _check_clip(key: str, value, *, upper_open: bool) -> None:
    """A clip range in [0, 1) (or [0, 1] where 1 means "no bound on that side", CISPO's lower side)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value > 1 \
            or (upper_open and value == 1):
        raise ConfigError(key, value, "a number in [0, 1)" if upper_open else "a number in [0, 1]")


# ----------------------------------------------------------------------------- algorithms

class Advantage(str, Enum):
    """The advantage estimator of an algorithm (a str, so it compares and prints as its name)."""

    GRPO = "grpo"  # (R - mean_g R) / (std_g R + eps)
    DR_GRPO = "dr_grpo"  # R - mean_g R
    RLOO = "rloo"  # R - mean of the other samples of the group
    REINFORCE = "reinforce"  # R - b, b a running mean (or EMA)
    GAE = "gae"  # PPO: generalised advantage estimation with a value model

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class AlgoSpec:
    """The defaults an algorithm fixes (see the module docstring's table)."""

    advantage: Advantage
    loss_algo: str  # a policy_loss algo
    aggregation: str
    eps_low: float = 0.2
    eps_high: float = 0.2
    dynamic_sampling: bool = False
    overlong_cache_frac: float = 0.0  # L_cache = frac * max_new_tokens


ALGORITHMS: Dict[str, AlgoSpec] = {
    "grpo": AlgoSpec(Advantage.GRPO, "grpo", "seq_mean"),
    "dr_grpo": AlgoSpec(Advantage.DR_GRPO, "grpo", "seq_mean_fixed_len"),
    "dapo": AlgoSpec(Advantage.GRPO, "grpo", "token_mean", eps_high=0.28, dynamic_sampling=True,
                     overlong_cache_frac=0.25),
    "gspo": AlgoSpec(Advantage.GRPO, "gspo", "seq_mean", eps_low=3e-4, eps_high=4e-4),
    "cispo": AlgoSpec(Advantage.GRPO, "cispo", "token_mean", eps_low=1.0, eps_high=5.0),
    "sapo": AlgoSpec(Advantage.GRPO, "sapo", "token_mean"),
    "rloo": AlgoSpec(Advantage.RLOO, "rloo", "token_mean"),
    "reinforce": AlgoSpec(Advantage.REINFORCE, "reinforce", "token_mean"),
}
GROUP_ADVANTAGES = (Advantage.GRPO, Advantage.DR_GRPO, Advantage.RLOO)


@dataclass
class ResolvedOptions:
    """The options one run uses, None fields resolved (shared with PPO)."""

    advantage: Advantage
    loss_algo: str
    aggregation: str
    eps_low: float
    eps_high: float
    dual_clip: Optional[float]
    beta: float
    kl_kind: str
    kl_in: str
    kl_clamp: Optional[float]
    c_ent: float
    tis_cap: Optional[float]
    steps_per_rollout: int
    mini_batches: int
    dynamic_sampling: bool = False
    resample_rounds: int = 0
    overlong_cache_len: int = 0
    whiten: bool = False
    adv_eps: float = 1e-4
    tau_pos: float = 1.0
    tau_neg: float = 1.05


def resolve_pg_options(cfg: PolicyGradientConfig, rollout: RolloutConfig) -> ResolvedOptions:
    """[pg] with None fields filled from ALGORITHMS[cfg.algo]; raises ValueError naming bad keys."""
    if cfg.algo not in ALGORITHMS:
        raise ConfigError("pg.algo", cfg.algo, f"one of {sorted(ALGORITHMS)}")
    check_policy_options("pg", cfg)
    if isinstance(cfg.iterations, bool) or not isinstance(cfg.iterations, int) or cfg.iterations < 1:
        raise ConfigError("pg.iterations", cfg.iterations, "an int >= 1")
    spec = ALGORITHMS[cfg.algo]
    pick = lambda value, default: default if value is None else value  # noqa: E731
    if cfg.eps_low is not None:  # CISPO's lower side may be 1 (no lower bound), as its default
        _check_clip("pg.eps_low", cfg.eps_low, upper_open=spec.loss_algo != "cispo")
    if cfg.eps_high is not None and (isinstance(cfg.eps_high, bool) or not cfg.eps_high > 0):
        raise ConfigError("pg.eps_high", cfg.eps_high, "None or a number > 0")
    if not cfg.adv_eps > 0:
        raise ConfigError("pg.adv_eps", cfg.adv_eps, "a number > 0")
    if cfg.baseline_decay is not None and not 0 <= cfg.baseline_decay < 1:
        raise ConfigError("pg.baseline_decay", cfg.baseline_decay, "None or a number in [0, 1)")
    for key in ("tau_pos", "tau_neg"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"pg.{key}", getattr(cfg, key), "a number > 0")
    dynamic = pick(cfg.dynamic_sampling, spec.dynamic_sampling)
    if spec.advantage in GROUP_ADVANTAGES and rollout.group_size < 2:
        raise ConfigError("rollout.group_size", rollout.group_size, ">= 2",
                          f"rollout.group_size: algo {cfg.algo!r} compares completions within a group and needs "
                          f"group_size >= 2, got {rollout.group_size}")
    if dynamic and rollout.group_size < 2:
        raise ConfigError("pg.dynamic_sampling", True, "rollout.group_size >= 2",
                          f"pg.dynamic_sampling: needs rollout.group_size >= 2, got {rollout.group_size}")
    cache = pick(cfg.overlong_cache_len, int(spec.overlong_cache_frac * rollout.max_new_tokens))
    if isinstance(cache, bool) or not isinstance(cache, int) or not 0 <= cache <= rollout.max_new_tokens:
        raise ConfigError("pg.overlong_cache_len", cache, f"an int in [0, rollout.max_new_tokens="
                          f"{rollout.max_new_tokens}]")
    return ResolvedOptions(
        advantage=spec.advantage, loss_algo=spec.loss_algo, aggregation=pick(cfg.aggregation, spec.aggregation),
        eps_low=pick(cfg.eps_low, spec.eps_low), eps_high=pick(cfg.eps_high, spec.eps_high),
        dual_clip=cfg.dual_clip, beta=cfg.beta, kl_kind=cfg.kl_kind, kl_in=cfg.kl_in, kl_clamp=cfg.kl_clamp,
        c_ent=cfg.c_ent, tis_cap=cfg.tis_cap, steps_per_rollout=cfg.iterations * cfg.mini_batches,
        mini_batches=cfg.mini_batches, dynamic_sampling=dynamic, resample_rounds=cfg.resample_rounds,
        overlong_cache_len=cache, whiten=cfg.whiten, adv_eps=cfg.adv_eps, tau_pos=cfg.tau_pos,
        tau_neg=cfg.tau_neg)
