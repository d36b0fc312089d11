"""RLHF stages as plug-ins of the one training loop.

A stage builder takes (cfg, model, tokenizer) and returns a
`fusedrl.stages.base.Stage`. Register a new stage by adding its builder
to STAGES (explicitly: no import-time registration), and, when its config
tables are not fields of `TrainConfig`, the root config class that has them to
STAGE_CONFIGS (`fusedrl train` parses the TOML with it), and, when it trains a
model other than the causal-LM policy, that model's builder to STAGE_MODELS.
"""
import dataclasses

from fusedrl.config import TrainConfig
from fusedrl.stages.base import BaseStage, Stage
from fusedrl.stages.sft import SFTStage, build_sft_stage
from fusedrl.stages.configs_alignment import AlignmentTrainConfig
from fusedrl.stages.dpo import build_dpo_stage
from fusedrl.stages.rejection import build_rejection_stage
from fusedrl.stages.reward_model import build_reward_model, build_reward_model_stage
from fusedrl.stages.configs_rl import RLTrainConfig
from fusedrl.stages.policy_gradient import PG_STAGES
from fusedrl.stages.ppo import build_ppo_stage
from fusedrl.stages.configs_distill import DistillTrainConfig
from fusedrl.stages.distill import build_distill_stage

STAGES = {
    "sft": build_sft_stage,
    "reward_model": build_reward_model_stage,
    "rejection": build_rejection_stage,
    "dpo": build_dpo_stage,
    **PG_STAGES,  # grpo, dr_grpo, dapo, gspo, cispo, sapo, rloo, reinforce
    "ppo": build_ppo_stage,
    "distill": build_distill_stage,
}

# Root config class by stage name; stages not listed use TrainConfig.
STAGE_CONFIGS = {
    "sft": TrainConfig,
    "reward_model": AlignmentTrainConfig,
    "rejection": AlignmentTrainConfig,
    "dpo": AlignmentTrainConfig,
    **{name: RLTrainConfig for name in [*PG_STAGES, "ppo"]},
    "distill": DistillTrainConfig,
}

def check_stage_config(cfg, stage: str) -> None:
    """Every check of the stage's own tables, run when the config is loaded (ConfigError naming the field)."""
    import dataclasses

    from fusedrl.config_io import ConfigError
    from fusedrl.stages.configs_alignment import check_section
    from fusedrl.stages.configs_rl import check_rollout, resolve_pg_options
    from fusedrl.stages.ppo import resolve_ppo_options

    if stage in PG_STAGES:
        if cfg.pg.algo not in (stage, "grpo"):  # "grpo" is the field's default; run.stage names the algorithm
            raise ConfigError("pg.algo", cfg.pg.algo, [stage],
                              f"pg.algo: {cfg.pg.algo!r} contradicts run.stage = {stage!r}; remove pg.algo "
                              "(run.stage names the algorithm) or make them agree")
        resolve_pg_options(dataclasses.replace(cfg.pg, algo=stage), cfg.rollout)
        check_rollout(cfg.rollout)
    elif stage == "ppo":
        resolve_ppo_options(cfg.ppo)
        check_rollout(cfg.rollout)
    elif stage in ("reward_model", "rejection", "dpo"):
        check_section(getattr(cfg, stage), stage)
    elif stage == "distill":
        from fusedrl.stages.configs_distill import check_distill

        check_distill(cfg.distill, cfg.rollout)
        check_rollout(cfg.rollout, require_reward=False)


@dataclasses.dataclass
class ReferenceConfig(RLTrainConfig, AlignmentTrainConfig):
    """Every table any stage reads (what `fusedrl config --reference` documents)."""


# Model builder by stage name, for stages that train something other than the causal-LM
# policy; builders take (cfg, tokenizer, device). Stages not listed train the policy.
STAGE_MODELS = {
    "reward_model": build_reward_model,
}

__all__ = ["STAGES", "STAGE_CONFIGS", "STAGE_MODELS", "BaseStage", "Stage", "SFTStage", "build_sft_stage",
           "check_stage_config", "ReferenceConfig"]
