"""The demo's RL steps: GRPO with a verifier reward, PPO with the reward model's reward.

Each step has the signature of `fusedrl.demo.pipeline.DEMO_STEPS` entries,
``step(ctx: DemoContext) -> dict`` of numbers for the report, and trains
``ctx.model`` (the policy) in place:

    grpo   G samples per training prompt, rewarded by a verifier (`rewards:shaped_match`: per-character
           credit plus 1 for an exact answer), group-normalised advantages; reports the rollout reward
           and exact-match accuracy of the first and last rollouts
    ppo    rewarded by the reward model of the `reward_model` step (`ctx.reward_model`), with a value
           model initialised from it, GAE and the KL to the policy before the step folded into the
           reward; reports the same, plus the critic's last value loss

Step lengths scale with the demo's ``loop.max_steps`` (so ``--quick`` shortens
them); ``[demo] stage_overrides`` (e.g. ``{grpo = {"loop.max_steps" = 20,
"rollout.group_size" = 8}}``) override any field of these stages' configs.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List

from fusedrl.demo.common import demo_stage_config
from fusedrl.train.loop import train
from fusedrl.train.metrics import read_metrics, write_plots
from fusedrl.models.causal_lm import save_model
from fusedrl.stages.configs_rl import RLTrainConfig

logger = logging.getLogger("fusedrl")

# Per-step defaults: (share of the demo's loop.max_steps, minimum steps, config overrides).
STAGE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    # Tuned on the demo's SFT -> RM -> rejection -> DPO policy (greedy score ~0.75): 150 steps of
    # 16 prompts x 8 samples lift it by ~0.1; lr 1e-3 collapses the policy.
    "grpo": {"share": 0.5, "min_steps": 8, "overrides": {
        "optim.lr": 3e-4, "schedule.warmup_steps": 0, "schedule.decay": "constant",
        "rollout.prompts_per_rollout": 16, "rollout.group_size": 8, "rollout.temperature": 1.0,
        "rollout.verifier": "fusedrl.rollout.rewards:shaped_match", "rollout.eval_prompts": 32,
        "pg.algo": "grpo", "pg.beta": 0.0}},
    # The demo's reward model ranks right over wrong answers ~2 times in 3; optimising it harder
    # than this (higher lr, longer, lower beta) trades task accuracy for reward-model score.
    "ppo": {"share": 0.08, "min_steps": 8, "overrides": {
        "optim.lr": 3e-5, "schedule.warmup_steps": 0, "schedule.decay": "constant",
        "rollout.prompts_per_rollout": 16, "rollout.group_size": 4, "rollout.temperature": 1.0,
        "rollout.eval_prompts": 32, "ppo.epochs": 1, "ppo.mini_batches": 2, "ppo.value_lr": 1e-3,
        "ppo.beta": 0.1, "ppo.kl_kind": "k1"}},
}


def stage_config(ctx, stage: str) -> RLTrainConfig:
    """An RLTrainConfig for ``stage``: the demo's tables, this module's defaults, [demo] stage_overrides."""
    return demo_stage_config(ctx, stage, RLTrainConfig, STAGE_DEFAULTS, prepare=_rl_settings)


def _rl_settings(cfg: RLTrainConfig, ctx) -> None:
    """The demo's generation length and data files (before the overrides, which may change them)."""
    cfg.rollout.max_new_tokens = ctx.cfg.demo.max_new_tokens
    cfg.data.train, cfg.data.eval = str(ctx.data["train"]), str(ctx.data["eval"])


def _train(cfg: RLTrainConfig, model, stage, tokenizer) -> Dict[str, Any]:
    """The loop, then the final model and plots in the stage's run folder; returns rollout numbers."""
    run_dir = Path(cfg.run.out_dir)
    result = train(model, stage, cfg, run_dir=run_dir)
    if hasattr(stage, "finish"):
        stage.finish()
    if cfg.checkpoint.save_final:
        save_model(model, run_dir / "final", tokenizer=tokenizer)
    records = read_metrics(run_dir / "metrics.jsonl")
    if cfg.logging.plots:
        write_plots(records, run_dir / "plots")
    rollouts: List[dict] = [r for r in records if r.get("kind") == "train" and "reward_mean" in r]
    numbers = {"steps": result.state.step}
    if rollouts:
        numbers.update({"reward first": rollouts[0]["reward_mean"], "reward last": rollouts[-1]["reward_mean"]})
        if "accuracy" in rollouts[-1]:
            numbers.update({"sample acc first": rollouts[0]["accuracy"], "sample acc last": rollouts[-1]["accuracy"]})
    return numbers, result


def grpo_step(ctx) -> Dict[str, Any]:
    """GRPO on the training prompts with the verifier reward."""
    from fusedrl.stages.policy_gradient import build_policy_gradient_stage

    cfg = stage_config(ctx, "grpo")
    stage = build_policy_gradient_stage(cfg, ctx.model, ctx.tokenizer)
    numbers, _ = _train(cfg, ctx.model, stage, ctx.tokenizer)
    return numbers


def ppo_step(ctx) -> Dict[str, Any]:
    """PPO with the reward model of the `reward_model` step as reward and as the critic's start."""
    from fusedrl.rollout.experience import RewardSource
    from fusedrl.stages.policy_gradient import load_prompt_records
    from fusedrl.stages.ppo import PPOStage, resolve_ppo_options

    rm = getattr(ctx, "reward_model", None)
    if rm is None:
        raise ValueError("demo.stages: 'ppo' needs the 'reward_model' step before it (its reward model)")
    cfg = stage_config(ctx, "ppo")
    records, eval_records = load_prompt_records(cfg)
    scorer = copy.deepcopy(rm).eval().requires_grad_(False)
    value_model = copy.deepcopy(rm).train().requires_grad_(True)
    rewards = RewardSource(reward_model=scorer, token_budget=cfg.rollout.token_budget,
                           accuracy_verifier=cfg.rollout.accuracy_verifier)
    stage = PPOStage(value_model=value_model, ppo=cfg.ppo, max_grad_norm=cfg.optim.max_grad_norm, records=records,
                     tokenizer=ctx.tokenizer, rollout=cfg.rollout, options=resolve_ppo_options(cfg.ppo),
                     rewards=rewards, eval_records=eval_records, seed=cfg.run.seed, name="ppo")
    numbers, result = _train(cfg, ctx.model, stage, ctx.tokenizer)
    numbers["value loss"] = result.last_metrics.get("value_loss")
    return numbers


RL_STEPS = {"grpo": grpo_step, "ppo": ppo_step}
