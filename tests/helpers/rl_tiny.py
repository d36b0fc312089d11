"""Tiny RL fixtures: a 4-letter char tokenizer, a 1-layer qwen2, prompt records and a learnable reward."""
from __future__ import annotations

import copy

import torch

from fusedrl.config import TrainConfig
from fusedrl.models.causal_lm import build_model
from fusedrl.rollout.experience import RewardSource
from fusedrl.stages.configs_rl import PolicyGradientConfig, PPOConfig, RolloutConfig
from fusedrl.data.tokenizer import build_char_tokenizer

PROMPTS = ["a", "b", "c", "d", "ab", "cd", "bc", "da"]
REWARD = "tests.helpers.rl_tiny:fraction_of_a"


def fraction_of_a(prompt: str, completion: str, **fields) -> float:
    """The trivially learnable reward: the share of 'a' among the completion's characters."""
    return completion.count("a") / max(len(completion), 1)


def constant_for_ab(prompt: str, completion: str, **fields) -> float:
    """Constant (1.0) for prompts 'a' and 'b' (their groups carry no signal); fraction_of_a otherwise."""
    return 1.0 if prompt in ("a", "b") else fraction_of_a(prompt, completion)


def tokenizer():
    return build_char_tokenizer("abcd")


def tiny_policy(tok, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config={
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(tok), "max_position_embeddings": 64,
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True})


def records(prompts=PROMPTS):
    return [{"prompt": p, "answer": "a" * 3} for p in prompts]


def rollout_cfg(**overrides) -> RolloutConfig:
    base = dict(prompts_per_rollout=8, group_size=4, max_new_tokens=4, token_budget=128, verifier=REWARD)
    return RolloutConfig(**{**base, **overrides})


def rewards(verifier: str = REWARD) -> RewardSource:
    return RewardSource(verifier=verifier, accuracy_verifier="fusedrl.rollout.rewards:exact_match")


def train_cfg(steps: int, lr: float = 1e-2) -> TrainConfig:
    cfg = TrainConfig()
    cfg.loop.max_steps = steps
    cfg.optim.lr = lr
    cfg.logging.progress = False
    cfg.schedule.decay = "constant"
    cfg.checkpoint.save_final = False
    return cfg


def pg_stage(tok, *, algo="grpo", rollout=None, verifier=REWARD, ref_model=None, evaluate=False, **pg):
    from fusedrl.stages.policy_gradient import PolicyGradientStage, resolve_pg_options

    rollout = rollout or rollout_cfg()
    options = resolve_pg_options(PolicyGradientConfig(algo=algo, **pg), rollout)
    return PolicyGradientStage(records=records(), tokenizer=tok, rollout=rollout, options=options,
                               rewards=rewards(verifier), eval_records=records()[:4] if evaluate else None,
                               ref_model=ref_model, seed=0,
                               name=algo)


def ppo_stage(tok, model, *, rollout=None, **ppo):
    from fusedrl.models.scalar_head import ScalarHeadModel
    from fusedrl.stages.ppo import PPOStage, resolve_ppo_options

    rollout = rollout or rollout_cfg()
    cfg = PPOConfig(**{"value_lr": 1e-2, **ppo})
    value = ScalarHeadModel.from_causal_lm(copy.deepcopy(model), init_std=0.0)
    return PPOStage(value_model=value, ppo=cfg, records=records(), tokenizer=tok, rollout=rollout,
                    options=resolve_ppo_options(cfg), rewards=rewards(), seed=0)
