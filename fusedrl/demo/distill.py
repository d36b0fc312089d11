"""The demo's distillation step: a smaller student distilled from the demo's policy (the teacher).

    distill  a student with the first half of the policy's layers (a copy of its embeddings, first
             layer(s), final norm and head: DistilBERT's initialisation; `student = "small"` in
             `distill_step` is a fresh Qwen2 with half the hidden size and one layer instead),
             trained by GKD (`distill.mode = "mixed"`): each step, with probability lam, on its own
             samples, else on the training data's completions, the per-token reverse KL to the
             frozen policy is the loss (`fusedrl.stages.distill`). Reports the student's task score
             (greedy exact match on the held-out prompts, as for every other step) before and after,
             its size, and the divergence of the first and last steps. The policy itself is
             unchanged, so the pipeline's score after this step is the teacher's, and the step runs
             last, so no other step's score depends on it.

Step length scales with the demo's ``loop.max_steps`` (``--quick`` shortens it); ``[demo]
stage_overrides`` (e.g. ``{distill = {"loop.max_steps" = 100, "distill.lam" = 1.0}}``) override
any field of the step's `DistillTrainConfig`.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from fusedrl.demo.common import demo_stage_config
from fusedrl.stages.configs_distill import DistillTrainConfig

logger = logging.getLogger("fusedrl")

STUDENTS = ("truncated", "small")  # the policy's first half of the layers (default), or a fresh half-size model

# Per-step defaults: (share of the demo's loop.max_steps, minimum steps, config overrides).
STAGE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "distill": {"share": 0.1, "min_steps": 40, "overrides": {
        "optim.lr": 1e-3, "schedule.warmup_steps": 0, "schedule.decay": "constant",
        "rollout.prompts_per_rollout": 16, "rollout.group_size": 1, "rollout.temperature": 1.0,
        "rollout.token_budget": 1024, "distill.mode": "mixed", "distill.lam": 0.3, "distill.kind": "reverse_kl",
        "distill.teacher": "demo-policy", "checkpoint.save_final": False}},
}


def stage_config(ctx, stage: str = "distill") -> DistillTrainConfig:
    """A DistillTrainConfig: the demo's tables, this module's defaults, [demo] stage_overrides."""
    def prepare(cfg, ctx):
        cfg.rollout.max_new_tokens = ctx.cfg.demo.max_new_tokens
        cfg.data.train, cfg.data.eval = str(ctx.data["train"]), str(ctx.data["eval"])

    return demo_stage_config(ctx, stage, DistillTrainConfig, STAGE_DEFAULTS, prepare=prepare)


def student_arch(policy) -> dict:
    """The student's config: the policy's, with half the hidden and intermediate sizes and one layer."""
    arch = policy.config.to_dict()
    heads = max(1, arch.get("num_attention_heads", 2) // 2)
    kv = max(1, min(arch.get("num_key_value_heads", heads), heads))
    while heads % kv:
        kv -= 1
    hidden = max(heads * 8, arch["hidden_size"] // 2)
    keep = ("model_type", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id", "rms_norm_eps", "rope_theta")
    out = {k: arch[k] for k in keep if k in arch and arch[k] is not None}
    out.update(hidden_size=hidden - hidden % heads, intermediate_size=max(16, arch.get("intermediate_size", 4 * hidden) // 2),
               num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv)
    return out


def truncated_student(policy):
    """A copy of the policy keeping its first half of the layers (at least one): DistilBERT's initialisation."""
    import torch

    student = copy.deepcopy(policy)
    keep = max(1, student.config.num_hidden_layers // 2)
    student.model.layers = torch.nn.ModuleList(list(student.model.layers)[:keep])
    student.config.num_hidden_layers = keep
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = list(student.config.layer_types)[:keep]
    for index, layer in enumerate(student.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = index
    return student


def make_student(ctx, kind: str):
    """The student: "truncated" (the policy's first half of the layers) or "small" (a fresh `student_arch`)."""
    import torch

    from fusedrl.models.causal_lm import build_model

    if kind not in STUDENTS:
        raise ValueError(f"student: expected one of {STUDENTS}, got {kind!r}")
    if kind == "truncated":
        return truncated_student(ctx.model)
    device = next(ctx.model.parameters()).device
    torch.manual_seed(ctx.cfg.run.seed)
    return build_model(config=student_arch(ctx.model), dtype=next(ctx.model.parameters()).dtype, device=device)


def distill_step(ctx, student_kind: Optional[str] = None) -> Dict[str, Any]:
    """Distil the current policy into a student; report the student's task score before and after."""
    from fusedrl.models.causal_lm import lm_head
    from fusedrl.rollout.experience import RewardSource
    from fusedrl.rollout.teacher import checked_teacher
    from fusedrl.stages.distill import DistillStage, completion_pairs
    from fusedrl.stages.policy_gradient import load_prompt_records
    from fusedrl.train.loop import train

    kind = student_kind or STUDENTS[0]
    cfg = stage_config(ctx)
    device = next(ctx.model.parameters()).device
    teacher = checked_teacher(copy.deepcopy(ctx.model), device=device, vocab_size=lm_head(ctx.model)[0].shape[0])
    student = make_student(ctx, kind)
    before = ctx.score(student)
    records, eval_records = load_prompt_records(cfg)
    rewards = RewardSource(verifier=cfg.rollout.accuracy_verifier, accuracy_verifier=cfg.rollout.accuracy_verifier) \
        if cfg.rollout.accuracy_verifier else None
    stage = DistillStage(records=records, tokenizer=ctx.tokenizer, rollout=cfg.rollout, distill=cfg.distill,
                         teacher=teacher, rewards=rewards, eval_records=eval_records, seed=cfg.run.seed,
                         data_pairs=completion_pairs(records, ctx.tokenizer, cfg.data.max_len))
    divergences = []
    result = train(student, stage, cfg, run_dir=Path(cfg.run.out_dir),
                   on_step_end=lambda step, metrics: divergences.append(metrics.get("divergence")))
    score = ctx.score(student)
    ctx.student = student
    logger.info("demo: distilled student (%s, %d parameters) task score %.3f -> %.3f", kind,
                sum(p.numel() for p in student.parameters()), before, score)
    return {"steps": result.state.step, "student": kind, "student before": before, "student score": score,
            "student params": sum(p.numel() for p in student.parameters()),
            "teacher params": sum(p.numel() for p in ctx.model.parameters()),
            "divergence first": divergences[0] if divergences else None,
            "divergence last": divergences[-1] if divergences else None}


DISTILL_STEPS = {"distill": distill_step}
