"""TRL trainers whose log-probs and loss run on fusedrl's kernels (TRL >= 1.16, < 2).

    from fusedrl.integrations.trl import FusedGRPOTrainer, FusedDPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

Hooks used, all public: the trainers' constructors, `Trainer.compute_loss` and `Trainer.log`
(overridden), and the `model(..., labels=..., fused_lm_head=True)` call protocol of TRL's
fused LM head (TRL >= 1.16), which `fusedrl.integrations.hf.patch_causal_lm` implements with
`linear_logprobs`. After `super().__init__`, the policy and reference models are re-patched,
so every per-token log-prob TRL asks for (generation-time old/ref log-probs included) comes
from fusedrl's kernel; `compute_loss` then computes the loss with `policy_loss` (GRPO) or the
DPO-family losses. Configurations outside the supported set keep TRL's own loss
(`fused_loss_supported()` says which), still on fusedrl's log-probs.
"""
from __future__ import annotations

from collections import defaultdict

import torch

try:
    from trl import DPOTrainer, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fusedrl.integrations.trl needs TRL: pip install 'fusedrl[trl]'") from exc

from fusedrl.kernels import apo_down_loss, apo_zero_loss, dpo_loss, ipo_loss, policy_loss

from .hf import patch_causal_lm
from .modules import GRPO_LOSS_TYPES, grpo_aggregation

SUPPORTED_TRL = ">=1.16,<2"
DPO_LOSSES = ("sigmoid", "ipo", "apo_zero", "apo_down")
_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
               "mm_token_type_ids", "image_position_ids", "num_images", "spatial_shapes", "num_tiles")


def _patch(trainer, model, **options) -> None:
    if model is None or trainer.aux_loss_enabled:  # MoE aux loss: TRL's head computes it, ours does not
        return
    model = trainer.accelerator.unwrap_model(model)
    if hasattr(model, "get_base_model"):  # PEFT: patch the wrapped transformers model, as TRL does
        model = model.get_base_model()
    patch_causal_lm(model, **options)


class _MetricsMixin:
    """Collects this class's loss metrics and hands them to `Trainer.log` (mean per logging step)."""

    def _fusedrl_record(self, name: str, value) -> None:
        mode = "train" if self.model.training else "eval"
        if not hasattr(self, "_fusedrl_metrics"):
            self._fusedrl_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._fusedrl_metrics[mode][name].append(float(value))

    def log(self, logs, start_time=None):
        buffers = getattr(self, "_fusedrl_metrics", None)
        if buffers is not None:
            mode = "train" if self.model.training else "eval"
            prefix = "eval_" if mode == "eval" else ""
            for name, values in buffers[mode].items():
                if values:
                    logs.setdefault(prefix + name, sum(values) / len(values))
            buffers[mode].clear()
        return super().log(logs, start_time)


class FusedGRPOTrainer(_MetricsMixin, GRPOTrainer):
    """`trl.GRPOTrainer` with fusedrl's log-probs and, for loss_type grpo / bnpo / dr_grpo / dapo,
    fusedrl's `policy_loss` (clipped surrogate, k3 KL), same arguments as `GRPOTrainer`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _patch(self, self.model, temperature=self.args.temperature, outputs=("log_probs", "entropy"))
        _patch(self, self.ref_model, temperature=self.args.temperature)

    def fused_loss_supported(self, inputs=None) -> bool:
        """Whether `compute_loss` runs fusedrl's loss (else TRL's, on fusedrl's log-probs)."""
        a = self.args
        if a.loss_type not in GRPO_LOSS_TYPES or a.importance_sampling_level != "token" or a.delta is not None:
            return False
        if a.off_policy_mask_threshold is not None or a.top_entropy_quantile < 1.0:
            return False
        if a.entropy_coef != 0.0 or a.use_adaptive_entropy or self.aux_loss_enabled:
            return False
        if a.use_vllm and a.vllm_importance_sampling_correction:
            return False
        if a.beta != 0.0 and a.use_bias_correction_kl:  # TRL scales the KL by the (differentiable) IS ratio
            return False
        return inputs is None or not any(inputs.get(k) is not None for k in _MULTIMODAL)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.fused_loss_supported(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        keep = completion_ids.size(1)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-keep] = -100
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        logp, entropy = out.log_probs[:, -keep:], out.entropy[:, -keep:]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        a, train = self.args, self.model.training
        accumulation = getattr(self, "current_gradient_accumulation_steps", a.gradient_accumulation_steps)
        options = grpo_aggregation(a.loss_type, a.max_completion_length)
        if a.loss_type == "dapo":  # TRL's global completion-token count, rescaled to one accumulation window
            tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            options["num_tokens"] = tokens * accumulation / a.steps_per_generation if train else tokens
        eps_high = a.epsilon_high if a.epsilon_high is not None else a.epsilon
        beta = a.beta
        loss, metrics = policy_loss(logp, inputs.get("old_per_token_logps"), inputs["advantages"], mask,
                                    algo="grpo", eps_low=a.epsilon, eps_high=eps_high, beta=beta, kl_kind="k3",
                                    ref_logp=inputs.get("ref_per_token_logps") if beta else None,
                                    entropy=entropy.detach(), **options)
        if a.loss_type != "dapo" and train:
            loss = loss / accumulation
        self._fusedrl_record("entropy", metrics["entropy"])
        self._fusedrl_record("clip_ratio/region_mean", metrics["clip_frac"])
        if beta:
            self._fusedrl_record("kl", metrics["kl_ref"])
        return loss


class FusedDPOTrainer(_MetricsMixin, DPOTrainer):
    """`trl.DPOTrainer` with fusedrl's log-probs (and the mean-logit / top-1 statistics from the
    same fused pass) and, for loss_type sigmoid / ipo / apo_zero / apo_down, fusedrl's losses."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.use_weighting:  # WPO needs log(sum p^2): keep TRL's head for it
            return
        _patch(self, self.model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        _patch(self, self.ref_model)

    def fused_loss_supported(self, inputs=None) -> bool:
        """Whether `compute_loss` runs fusedrl's loss (else TRL's, on fusedrl's log-probs)."""
        a = self.args
        if any(t not in DPO_LOSSES for t in a.loss_type) or a.use_weighting or a.ld_alpha is not None:
            return False
        if a.f_divergence_type != "reverse_kl" or self.aux_loss_enabled:
            return False
        if self.ref_model is None and not a.precompute_ref_log_probs:  # PEFT: reference = adapters disabled
            return False
        return inputs is None or not any(inputs.get(k) is not None for k in _MULTIMODAL)

    def _sequence_logps(self, model, model_kwargs, labels, keep):
        out = model(**model_kwargs, labels=labels, fused_lm_head=True)
        return out, out.log_probs[:, -keep:].sum(dim=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.fused_loss_supported(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        completion_mask = inputs["completion_mask"]
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        keep = completion_mask.size(1) - 1
        out, logps = self._sequence_logps(model, model_kwargs, labels, keep)
        if self.args.precompute_ref_log_probs:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            with torch.no_grad():
                ref = self._sequence_logps(self.ref_model, model_kwargs, labels, keep)[1]
        loss = self._loss(logps, ref, completion_mask)
        self._record(out, logps, ref, completion_mask[:, 1:], keep)
        return loss

    def _loss(self, logps, ref, completion_mask):
        c, r = logps.chunk(2)
        rc, rr = ref.chunk(2)
        weights = self.args.loss_weights or [1.0] * len(self.args.loss_type)
        total = 0.0
        for loss_type, weight in zip(self.args.loss_type, weights):
            if loss_type == "ipo":  # TRL normalises IPO's log-ratios by the completion length
                lc, lr = (m.sum(dim=1).clamp(min=1.0) for m in completion_mask.chunk(2))
                loss = ipo_loss(c / lc, r / lr, rc / lc, rr / lr, beta=self.args.beta)[0]
            else:
                fn = {"sigmoid": dpo_loss, "apo_zero": apo_zero_loss, "apo_down": apo_down_loss}[loss_type]
                loss = fn(c, r, rc, rr, beta=self.args.beta)[0]
            total = total + weight * loss
        return total

    def _record(self, out, logps, ref, shift_mask, keep):
        """TRL's DPO metrics, from the fused pass (mean logits and top-1 flags included)."""
        c, r = logps.detach().chunk(2)
        rc, rr = ref.detach().chunk(2)
        chosen_reward, rejected_reward = self.args.beta * (c - rc), self.args.beta * (r - rr)
        chosen_mask, rejected_mask = shift_mask.bool().chunk(2)
        ml_c, ml_r = out.mean_logits[:, -keep:].chunk(2)
        top1_c = out.is_top1[:, -keep:].chunk(2)[0]
        entropy = out.entropy[:, -keep:].detach()
        record = self._fusedrl_record
        record("entropy", (entropy * shift_mask).sum() / shift_mask.sum().clamp(min=1))
        record("logits/chosen", ml_c[chosen_mask].sum() / chosen_mask.sum().clamp(min=1))
        record("logits/rejected", ml_r[rejected_mask].sum() / rejected_mask.sum().clamp(min=1))
        record("mean_token_accuracy", (top1_c & chosen_mask).sum() / chosen_mask.sum().clamp(min=1))
        record("rewards/chosen", chosen_reward.mean())
        record("rewards/rejected", rejected_reward.mean())
        record("rewards/accuracies", (chosen_reward > rejected_reward).float().mean())
        record("rewards/margins", (chosen_reward - rejected_reward).mean())
        record("logps/chosen", c.mean())
        record("logps/rejected", r.mean())
