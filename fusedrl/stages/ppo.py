"""PPO: clipped surrogate with a learned value model, GAE, value clipping, KL folded into the reward.

Per rollout batch (P prompts x G completions, see `PolicyGradientStage` for the
sampling, scoring and reuse schedule), with t over completion tokens:

    V_t      value model (a backbone with a scalar head) at rollout time   -> old_values
    r_t      = -beta * KL_t(old || ref) + R on the last token               (fold_kl_into_rewards)
               + prm_weight * (s_k - prm_baseline) at the token ending step k   (rollout.process_reward_model)
    A_t, G_t = GAE(r, V; gamma, lambda) per sequence on the packed layout    (kernels.gae, cu_seqlens)
    A_t      whitened over the batch (option)
    loss     = policy_loss(ppo clip, eps) + vf_coef * value_loss(V, old_values, G, eps_v)

Several optimizer steps per rollout: `epochs` passes, each split into
`mini_batches` steps; the stage draws a new rollout every epochs * mini_batches
steps (the buffer is in `state_dict()`).

The critic has its own AdamW (`ppo.value_lr`, constant, no weight decay, AdamW's
default betas and eps), as OpenRLHF and TRL's PPO do. The stage declares it with
`trainables()`; the loop owns it like the policy's: the backward fills both
models' gradients: the loop runs the policy's terms (`loss(..., with_value=False)`)
and the value loss (`value_terms`, from `module_losses()`) as two forwards/backwards
on the same micro-batch, each through its own model (under torchrun both are FSDP2
roots), clips each by optim.max_grad_norm and steps both, and checkpoints the
critic's weights as safetensors (value/) beside the policy's (DCP, sharded, under
torchrun). The stage's state holds no weights.

The value model: `ppo.value_model` if given, else a copy of the reward model
(`rollout.reward_model`), else the policy's backbone (copied) with a zero head.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict

import torch

from fusedrl.config import ConfigError
from fusedrl.data.batch import IGNORE_INDEX, PackedBatch
from fusedrl.rollout.experience import Experience, Rollout, token_forward
from fusedrl.stages.configs_rl import Advantage, PPOConfig, check_policy_options, check_rollout
from fusedrl.stages.base import POLICY, StepTotals, Trainable
from fusedrl.stages.policy_gradient import PolicyGradientStage, ResolvedOptions, load_prompt_records
from fusedrl.models.causal_lm import load_reference
from fusedrl.models.lora import base_copy, is_peft_model
from fusedrl.kernels import fold_kl_into_rewards, gae, value_loss, whiten


def resolve_ppo_options(cfg: PPOConfig) -> ResolvedOptions:
    """[ppo] as the options the shared stage code reads; raises ValueError naming bad keys."""
    check_policy_options("ppo", cfg)
    if isinstance(cfg.eps, bool) or not isinstance(cfg.eps, (int, float)) or not 0 < cfg.eps < 1:
        raise ConfigError("ppo.eps", cfg.eps, "a number in (0, 1)")
    for key in ("epochs", "mini_batches"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"ppo.{key}", value, "an int >= 1")
    for key in ("gamma", "lam"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"ppo.{key}", getattr(cfg, key), "a number in [0, 1]")
    if cfg.eps_v is not None and not cfg.eps_v > 0:
        raise ConfigError("ppo.eps_v", cfg.eps_v, "None or a number > 0")
    if not cfg.value_lr > 0 or cfg.vf_coef < 0:
        raise ConfigError("ppo.value_lr", (cfg.value_lr, cfg.vf_coef), "value_lr > 0 and vf_coef >= 0",
                          f"ppo.value_lr / ppo.vf_coef: expected > 0 / >= 0, got {cfg.value_lr!r} / {cfg.vf_coef!r}")
    return ResolvedOptions(advantage=Advantage.GAE, loss_algo="ppo", aggregation=cfg.aggregation, eps_low=cfg.eps,
                           eps_high=cfg.eps, dual_clip=cfg.dual_clip, beta=cfg.beta, kl_kind=cfg.kl_kind,
                           kl_in=cfg.kl_in, kl_clamp=None, c_ent=cfg.c_ent, tis_cap=cfg.tis_cap,
                           steps_per_rollout=cfg.epochs * cfg.mini_batches, mini_batches=cfg.mini_batches,
                           whiten=cfg.whiten)


class PPOStage(PolicyGradientStage):
    """PPO on top of the policy-gradient stage machinery (see the module docstring).

    Args:
        value_model: a `ScalarHeadModel` (token_values(batch) -> (total,)) on the policy's device.
        ppo: the [ppo] table (gamma, lam, eps_v, vf_coef, value_lr).
        **kwargs: as `PolicyGradientStage` (options from `resolve_ppo_options`).
    """

    name = "ppo"
    value_forward = True

    def __init__(self, *, value_model, ppo: PPOConfig, **kwargs):
        super().__init__(**kwargs)
        if not any(p.requires_grad for p in value_model.parameters()):
            raise ValueError("value_model: has no trainable parameter")
        self.value_model = value_model
        self.ppo = ppo

    def trainables(self, model) -> Dict[str, Trainable]:
        """The policy, and the critic with its own constant learning rate."""
        return {POLICY: Trainable(model),
                "value": Trainable(self.value_model, lr=self.ppo.value_lr, weight_decay=0.0, betas=(0.9, 0.999),
                                   eps=1e-8)}

    # ------------------------------------------------------------------ rollout-time values and GAE

    def _extra_forwards(self, exp: Experience, device) -> int:
        exp.tok["old_values"] = token_forward(exp, self.value_model.token_values, self.rollout.token_budget, device)
        return 1

    def _advantages(self, exp: Experience, rollout: Rollout) -> None:
        cu_seqlens = exp.completion_cu_seqlens()
        values = exp.completion_view("old_values")  # (T,) completion tokens of all samples, back to back
        if self.opt.beta > 0 and self.opt.kl_in == "reward":
            old, ref, beta = exp.completion_view("old_logp"), exp.completion_view("ref_logp"), self.opt.beta
        else:
            old = ref = torch.zeros_like(values)
            beta = 0.0
        rewards = fold_kl_into_rewards(exp.seq["rewards"], old, ref, cu_seqlens=cu_seqlens, beta=beta,
                                       kind=self.opt.kl_kind)  # (T,)
        kl_sum = exp.seq["rewards"].sum() - rewards.sum()  # beta * summed KL (before any dense reward)
        if self.distill_teacher is not None:  # dense on-policy distillation reward, per token
            rewards = rewards - self.distill_coef * exp.completion_view("distill_kl")
        if "dense_rewards" in exp.tok:  # a process reward model: prm_weight * (s_k - baseline) at step ends
            dense = exp.completion_view("dense_rewards")
            rewards = rewards + dense
            self._host["dense_reward"] = dense.sum().item() / len(exp)  # per completion
        advantages, returns = gae(rewards, values, cu_seqlens=cu_seqlens, gamma=self.ppo.gamma, lam=self.ppo.lam)
        if self.opt.whiten:
            advantages = whiten(advantages)
        exp.set_from_completion_view("advantages", advantages)
        exp.set_from_completion_view("returns", returns)
        self._host["value_rollout_mean"] = values.mean().item() if values.numel() else 0.0
        if beta > 0:
            self._host["kl_reward"] = (kl_sum / beta / len(exp)).item()

    # ------------------------------------------------------------------ the loss

    def loss(self, model, batch: PackedBatch, totals: StepTotals, *, with_value: bool = True):
        """The policy's terms plus vf_coef * the value loss; `with_value=False`: the policy's terms only
        (the loop then runs `value_terms` as the critic's own forward/backward: `module_losses`)."""
        loss, metrics = self._policy_terms(model, batch, totals)
        if not with_value:
            return loss, metrics
        v_loss, v_metrics = self.value_terms(self.value_model, batch, totals)
        metrics.update(v_metrics)
        return loss + v_loss, metrics

    def value_terms(self, critic, batch: PackedBatch, totals: StepTotals):
        """vf_coef * the clipped value loss of `critic` on the micro-batch, and its metrics.

        It reads only the critic, so its backward fills only the critic's gradients: the loop runs
        it as the critic's own forward (`run_forward(critic, ...)`, FSDP2: the critic is a root of
        its own) and backward, next to the policy's.
        """
        values = critic.token_values(batch)  # (total,) position t: the state before label t
        mask = batch.labels != IGNORE_INDEX
        v_loss, v_metrics = value_loss(values, batch.extras["old_values"], batch.extras["returns"], mask,
                                       eps_v=self.ppo.eps_v, num_tokens=totals.tokens)
        share = batch.num_tokens / totals.tokens
        metrics = {k: v * share for k, v in v_metrics.items()}
        metrics["value_loss"] = v_loss.detach()
        return self.ppo.vf_coef * v_loss, metrics

    def module_losses(self) -> Dict[str, object]:
        """Losses the loop runs as a forward/backward of their own module: {"value": value_terms}.
        The loop then calls `loss(..., with_value=False)` for the policy."""
        return {"value": lambda critic, batch, totals: self.value_terms(critic, batch, totals)}


def build_value_model(cfg, policy, device):
    """ppo.value_model, else a copy of rollout.reward_model, else the policy's backbone (copied) with a zero head."""
    from fusedrl.models.scalar_head import ScalarHeadModel

    source = cfg.ppo.value_model or cfg.rollout.reward_model
    if source is not None:
        return ScalarHeadModel.from_pretrained(source, device=device)
    backbone = base_copy(policy) if is_peft_model(policy) else copy.deepcopy(policy)  # LoRA: no adapters
    return ScalarHeadModel.from_causal_lm(backbone, init_std=0.0)


def build_ppo_stage(cfg, model, tokenizer) -> PPOStage:
    """The PPO stage of an `RLTrainConfig`: [rollout], [ppo], data.train / data.eval."""
    from fusedrl.rollout.experience import build_reward_source

    options = resolve_ppo_options(cfg.ppo)
    check_rollout(cfg.rollout)
    records, eval_records = load_prompt_records(cfg)
    device = next(model.parameters()).device
    ref = load_reference(cfg.model, cfg.ppo.ref_model, model) if options.beta > 0 else None
    from fusedrl.rollout.teacher import reward_teacher

    return PPOStage(value_model=build_value_model(cfg, model, device), ppo=dataclasses.replace(cfg.ppo),
                    records=records, tokenizer=tokenizer,
                    rollout=cfg.rollout, options=options,
                    rewards=build_reward_source(cfg.rollout, device, tokenizer=tokenizer, prm_dense=True),
                    eval_records=eval_records, ref_model=ref, seed=cfg.run.seed,
                    distill_teacher=reward_teacher(cfg.ppo, cfg.model, model), distill_coef=cfg.ppo.distill_coef)
