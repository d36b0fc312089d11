"""RLHF stages as plug-ins of the one training loop.

A stage builder takes (cfg: TrainConfig, model, tokenizer) and returns a
`fusedrl.engine.stages.base.Stage`. Register a new stage by adding its builder
here (explicitly: no import-time registration).
"""
from fusedrl.engine.stages.base import BaseStage, Stage
from fusedrl.engine.stages.sft import SFTStage, build_sft_stage

STAGES = {
    "sft": build_sft_stage,
}

__all__ = ["STAGES", "BaseStage", "Stage", "SFTStage", "build_sft_stage"]
