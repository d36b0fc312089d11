"""The validated options of `policy_loss` (one frozen dataclass) and their allowed values."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .kl import check_clamp, check_kl_kind

ALGOS = ("ppo", "grpo", "gspo", "gspo_token", "gmpo", "cispo", "sapo", "reinforce", "rloo", "clip_cov", "kl_cov")
AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum", "seq_mean_fixed_len")
IS_LEVELS = ("token", "sequence", "geometric")
IS_MODES = ("truncate", "mask")
IS_SCOPES = ("pg", "loss")
SEQ_RATIOS = ("mean", "sum")  # gspo's sequence log-ratio: mean (GSPO) or sum (TRL RLOO: exp(sum logp - sum old))
DUAL_CLIP_DEFAULT = 3.0  # verl's clip_ratio_c; dual_clip=True selects it
CLIPPED_ALGOS = ("ppo", "grpo", "gspo", "gspo_token", "clip_cov")
# the Triton constexpr of each algo (ppo and grpo, reinforce and rloo share their math)
ALGO_CODES = {"ppo": 0, "grpo": 0, "gspo": 1, "cispo": 2, "sapo": 3, "reinforce": 4, "rloo": 4, "gspo_token": 5,
              "gmpo": 6, "clip_cov": 7, "kl_cov": 8}


def _number(name: str, value, *, low: float, strict: bool = True, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if (value <= low) if strict else (value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")


def _choice(name: str, value, allowed, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}{' or None' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Validated options of `policy_loss` (see its docstring for each field).

    `dual_clip=True` is stored as DUAL_CLIP_DEFAULT (3.0); `kl_aggregation` and
    `entropy_aggregation` None are stored as `aggregation`.
    """

    algo: str = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Union[None, bool, float] = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    beta: float = 0.0
    kl_kind: str = "k3"
    kl_clamp: Optional[float] = None
    kl_value_clamp: Optional[float] = None
    c_ent: float = 0.0
    is_cap: float = 2.0
    is_low: Optional[float] = None
    is_level: str = "token"
    is_mode: str = "truncate"
    is_scope: str = "pg"
    is_veto: Optional[float] = None
    aggregation: str = "token_mean"
    kl_aggregation: Optional[str] = None
    entropy_aggregation: Optional[str] = None
    max_len: Optional[int] = None
    cov_ratio: float = 2e-4
    cov_lb: float = 1.0
    cov_ub: float = 5.0
    kl_cov_coef: float = 1.0
    seq_ratio: str = "mean"

    def __post_init__(self):
        _choice("algo", self.algo, ALGOS)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("kl_aggregation", self.kl_aggregation, AGGREGATIONS, allow_none=True)
        _choice("entropy_aggregation", self.entropy_aggregation, AGGREGATIONS, allow_none=True)
        object.__setattr__(self, "kl_aggregation", self.kl_aggregation or self.aggregation)
        object.__setattr__(self, "entropy_aggregation", self.entropy_aggregation or self.aggregation)
        _choice("is_level", self.is_level, IS_LEVELS)
        _choice("is_mode", self.is_mode, IS_MODES)
        _choice("is_scope", self.is_scope, IS_SCOPES)
        _choice("seq_ratio", self.seq_ratio, SEQ_RATIOS)
        if self.seq_ratio == "sum" and self.algo not in ("gspo", "gspo_token"):
            raise ValueError(f"seq_ratio='sum' applies to algo gspo/gspo_token only, got algo={self.algo!r}")
        _number("eps_low", self.eps_low, low=0.0, strict=False)
        _number("eps_high", self.eps_high, low=0.0, strict=False)
        if self.dual_clip is True:
            object.__setattr__(self, "dual_clip", DUAL_CLIP_DEFAULT)
        elif self.dual_clip is False:
            object.__setattr__(self, "dual_clip", None)
        _number("dual_clip", self.dual_clip, low=1.0, allow_none=True)
        if self.dual_clip is not None and self.algo not in CLIPPED_ALGOS:
            raise ValueError(f"dual_clip applies to algo ppo/grpo/gspo/gspo_token/clip_cov only, "
                             f"got algo={self.algo!r}")
        _number("tau_pos", self.tau_pos, low=0.0)
        _number("tau_neg", self.tau_neg, low=0.0)
        _number("beta", self.beta, low=0.0, strict=False)
        check_kl_kind(self.kl_kind, "kl_kind")
        check_clamp(self.kl_clamp, "kl_clamp")
        check_clamp(self.kl_value_clamp, "kl_value_clamp")
        _number("c_ent", self.c_ent, low=0.0, strict=False)
        _number("is_cap", self.is_cap, low=0.0)
        _number("is_low", self.is_low, low=0.0, strict=False, allow_none=True)
        _number("is_veto", self.is_veto, low=0.0, allow_none=True)
        if self.is_low is not None and self.is_low > self.is_cap:
            raise ValueError(f"is_low must be <= is_cap={self.is_cap}, got {self.is_low}")
        _number("cov_ratio", self.cov_ratio, low=0.0)
        _number("cov_lb", self.cov_lb, low=float("-inf"))
        _number("cov_ub", self.cov_ub, low=float("-inf"))
        _number("kl_cov_coef", self.kl_cov_coef, low=0.0, strict=False)
        if self.cov_ratio > 1:
            raise ValueError(f"cov_ratio must be in (0, 1], got {self.cov_ratio}")
        if "seq_mean_fixed_len" in (self.aggregation, self.kl_aggregation, self.entropy_aggregation):
            if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1:
                raise ValueError("aggregation 'seq_mean_fixed_len' needs max_len, a positive int; "
                                 f"got {self.max_len!r}")

    @property
    def algo_code(self) -> int:
        """The Triton constexpr of the algo (ALGO_CODES)."""
        return ALGO_CODES[self.algo]

    @property
    def seq_ratio_algo(self) -> bool:
        """The algos whose ratio is a per-sequence value (a first pass over the sequence)."""
        return self.algo in ("gspo", "gspo_token", "gmpo")
