"""RLHF stages as plug-ins of the one training loop.

A stage builder takes (cfg, model, tokenizer) and returns a
`fusedrl.engine.stages.base.Stage`. Register a new stage by adding its builder
to STAGES (explicitly: no import-time registration), and, when its config
tables are not fields of `TrainConfig`, the root config class that has them to
STAGE_CONFIGS (`fusedrl train` parses the TOML with it).
"""
from fusedrl.engine.config import TrainConfig
from fusedrl.engine.stages.base import BaseStage, Stage
from fusedrl.engine.stages.sft import SFTStage, build_sft_stage
from fusedrl.engine.stage_configs_alignment import AlignmentTrainConfig
from fusedrl.engine.stages.dpo import build_dpo_stage
from fusedrl.engine.stages.rejection import build_rejection_stage
from fusedrl.engine.stages.reward_model import build_reward_model_stage

STAGES = {
    "sft": build_sft_stage,
    "reward_model": build_reward_model_stage,
    "rejection": build_rejection_stage,
    "dpo": build_dpo_stage,
}

# Root config class by stage name; stages not listed use TrainConfig.
STAGE_CONFIGS = {
    "sft": TrainConfig,
    "reward_model": AlignmentTrainConfig,
    "rejection": AlignmentTrainConfig,
    "dpo": AlignmentTrainConfig,
}

__all__ = ["STAGES", "STAGE_CONFIGS", "BaseStage", "Stage", "SFTStage", "build_sft_stage"]
