"""The demo's middle steps: reward model, rejection sampling, DPO (after SFT).

Each step has the signature of `fusedrl.demo.pipeline.DEMO_STEPS` entries:
``step(ctx: DemoContext) -> dict`` of numbers for the report; it trains
``ctx.model`` in place (the reward model step trains a separate model and
leaves it in ``ctx.reward_model``).

    reward_model   pairs from the task: chosen = the right answer, rejected = a wrong one: the
                   policy's own wrong sample when one of 4 is wrong, else a corrupted answer (a
                   character changed, dropped, duplicated or two swapped); a scalar-head model
                   initialised from the SFT policy learns them; reports held-out pair accuracy
    rejection      N samples per training prompt from the policy, scored by that reward model,
                   best per prompt kept, SFT on them; reports exact-match of the selected vs a
                   random selection, and how often the RM ranks a right sample over a wrong one
    dpo            DPO + NLL ("rpo") on the same pairs against the policy's own starting
                   weights; reports held-out reward accuracy and margin

Each step also reports "rm score": the reward model's mean score of the policy's
greedy answers to the held-out prompts (the RM's view of the policy).

Step lengths scale with the demo's ``loop.max_steps`` (so ``--quick`` shortens them
too); ``[demo] stage_overrides`` (e.g. ``{dpo = {"loop.max_steps" = 30, "dpo.beta" = 0.2}}``)
override any field of these stages' configs.
"""
from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from fusedrl.demo.common import demo_stage_config
from fusedrl.train.loop import train
from fusedrl.train.metrics import read_metrics, write_plots
from fusedrl.models.causal_lm import save_model
from fusedrl.models.scalar_head import ScalarHeadModel
from fusedrl.stages.configs_alignment import AlignmentTrainConfig, check_section
from fusedrl.stages.dpo import build_dpo_stage
from fusedrl.stages.rejection import build_rejection_stage, sample_completions, score_completions
from fusedrl.stages.reward_model import build_reward_model_stage
from fusedrl.demo.tasks import exact_match
from fusedrl.demo.tasks import sample_completions as greedy_completions

logger = logging.getLogger("fusedrl")

# Per-stage defaults: (share of the demo's loop.max_steps, minimum steps, overrides).
STAGE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "reward_model": {"share": 0.67, "min_steps": 8, "overrides": {
        "optim.lr": 2e-4, "schedule.warmup_steps": 2, "reward_model.loss": "bradley_terry"}},
    "rejection": {"share": 0.06, "min_steps": 6, "overrides": {
        "optim.lr": 1e-4, "schedule.warmup_steps": 0, "rejection.num_samples": 8,
        "rejection.selection": "best_per_prompt", "rejection.temperature": 0.7, "rejection.max_prompts": 128}},
    # DPO + NLL: plain DPO lowers the chosen answers' likelihood too, which greedy decoding pays for.
    "dpo": {"share": 0.2, "min_steps": 6, "overrides": {
        "optim.lr": 5e-4, "schedule.warmup_steps": 0, "dpo.loss": "rpo", "dpo.beta": 0.2}},
}
MAX_PAIRS = 2000  # preference pairs made from the training split (at most)
SAMPLES_PER_PROMPT = 4  # policy samples per prompt searched for a wrong answer to reject


# ----------------------------------------------------------------------------- data

def corrupt(answer: str, rng: random.Random, alphabet: str) -> str:
    """A wrong answer close to ``answer``: one character changed, dropped, duplicated, or two swapped."""
    for _ in range(20):
        chars = list(answer)
        i = rng.randrange(len(chars))
        kind = rng.choice(("change", "drop", "duplicate", "swap"))
        if kind == "change":
            chars[i] = rng.choice([c for c in alphabet if c != chars[i]] or ["?"])
        elif kind == "drop" and len(chars) > 1:
            del chars[i]
        elif kind == "duplicate":
            chars.insert(i, chars[i])
        elif kind == "swap" and len(chars) > 1:
            j = min(i + 1, len(chars) - 1) if i + 1 < len(chars) else i - 1
            chars[i], chars[j] = chars[j], chars[i]
        wrong = "".join(chars)
        if wrong != answer:
            return wrong
    return answer + alphabet[0]


def preference_pairs(records: List[Dict[str, str]], *, seed: int, alphabet: str, limit: int = 0,
                     samples: Optional[List[List[str]]] = None) -> List[dict]:
    """``prompt``/``chosen``/``rejected`` records: the right answer over a wrong one.

    The wrong one is the first wrong completion among ``samples[i]`` (the policy's
    own mistakes, what a reward model must catch in its samples) when there is
    one, else a corruption of the answer.
    """
    rng = random.Random(seed)
    records = records[:limit] if limit else records
    pairs = []
    for i, r in enumerate(records):
        wrong = [c for c in (samples[i] if samples else []) if not exact_match(r["prompt"], c, answer=r["answer"])]
        pairs.append({"prompt": r["prompt"], "chosen": r["answer"],
                      "rejected": wrong[0].strip() if wrong and wrong[0].strip() else corrupt(r["answer"], rng,
                                                                                               alphabet)})
    return pairs


def _task_alphabet(ctx) -> str:
    return ctx.cfg.task.alphabet if ctx.cfg.task.kind == "reverse" else "0123456789"


def _records(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _write(path: Path, records: List[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ensure_preference_data(ctx) -> Dict[str, Path]:
    """Write (once) the pair files made from the task's train / eval splits; returns their paths."""
    if "pairs_train" not in ctx.data:
        alphabet, seed = _task_alphabet(ctx), ctx.cfg.run.seed
        data_dir = ctx.out_dir / "data"
        splits = {"train": _records(ctx.data["train"])[:MAX_PAIRS], "eval": list(ctx.eval_records)}
        pairs = {}
        for offset, (name, records) in enumerate(splits.items()):
            samples = sample_completions(ctx.model, ctx.tokenizer, records, num_samples=SAMPLES_PER_PROMPT,
                                         max_new_tokens=ctx.cfg.demo.max_new_tokens, seed=seed + offset)
            pairs[name] = preference_pairs(records, seed=seed + offset, alphabet=alphabet, samples=samples)
        train_pairs, eval_pairs = pairs["train"], pairs["eval"]
        ctx.data["pairs_train"] = _write(data_dir / "pairs_train.jsonl", train_pairs)
        ctx.data["pairs_eval"] = _write(data_dir / "pairs_eval.jsonl", eval_pairs)
    return {"train": ctx.data["pairs_train"], "eval": ctx.data["pairs_eval"]}


# ----------------------------------------------------------------------------- config and run

def stage_config(ctx, stage: str) -> AlignmentTrainConfig:
    """An AlignmentTrainConfig for ``stage``: the demo's tables, this module's defaults, [demo] stage_overrides."""
    cfg = demo_stage_config(ctx, stage, AlignmentTrainConfig, STAGE_DEFAULTS)
    check_section(getattr(cfg, stage), stage, require_scorer=False)  # the steps set the scorer themselves
    return cfg


def _train(cfg: AlignmentTrainConfig, model, stage, tokenizer):
    """The loop, then the final model and the plots in the stage's run folder (as run_training does)."""
    run_dir = Path(cfg.run.out_dir)
    result = train(model, stage, cfg, run_dir=run_dir)
    if cfg.checkpoint.save_final:
        save_model(model, run_dir / "final", tokenizer=tokenizer)
    if cfg.logging.plots:
        write_plots(read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots")
    return result


# ----------------------------------------------------------------------------- steps

def reward_model_step(ctx) -> Dict[str, Any]:
    """Train a reward model (initialised from the current policy) on right-vs-corrupted answers."""
    paths = ensure_preference_data(ctx)
    cfg = stage_config(ctx, "reward_model")
    cfg.data.train, cfg.data.eval = str(paths["train"]), str(paths["eval"])
    torch.manual_seed(cfg.run.seed)
    rm = ScalarHeadModel.from_causal_lm(copy.deepcopy(ctx.model), bias=cfg.reward_model.head_bias)
    stage = build_reward_model_stage(cfg, rm, ctx.tokenizer)
    before = _no_grad_eval(stage, rm)
    result = _train(cfg, rm, stage, ctx.tokenizer)
    rm.eval()
    ctx.reward_model = rm
    ctx.data["reward_model"] = Path(cfg.run.out_dir) / "final"
    after = result.eval_metrics
    return {"rm accuracy before": before.get("accuracy"), "rm accuracy": after.get("accuracy"),
            "rm margin": after.get("margin"), "rm score": rm_score(ctx), "steps": result.state.step}


def rejection_step(ctx) -> Dict[str, Any]:
    """Best-of-N fine-tuning of the policy with the reward model of the previous step."""
    rm = getattr(ctx, "reward_model", None)
    if rm is None:
        raise ValueError("demo.stages: 'rejection' needs the 'reward_model' step before it")
    cfg = stage_config(ctx, "rejection")
    prompts = _records(ctx.data["train"])[: cfg.rejection.max_prompts or None]
    cfg.data.train = str(_write(ctx.out_dir / "data" / "rejection_prompts.jsonl", prompts))
    cfg.rejection.reward_model = str(ctx.data.get("reward_model", ""))  # what the CLI would load
    cfg.rejection.max_new_tokens = ctx.cfg.demo.max_new_tokens
    stage = build_rejection_stage(cfg, ctx.model, ctx.tokenizer, scorer=rm)
    correct = torch.tensor([[exact_match(r["prompt"], c, answer=r["answer"]) for c in row]
                            for r, row in zip(prompts, stage.result.completions)])
    rows = stage.result.selected, stage.result.baseline
    selected_em, random_em = (float(correct[s[:, 0], s[:, 1]].mean()) for s in rows)
    result = _train(cfg, ctx.model, stage, ctx.tokenizer)
    return {"samples right": float(correct.mean()), "selected right": selected_em, "random right": random_em,
            "rm agreement": rm_agreement(stage.result.rewards, correct), "rm score": rm_score(ctx),
            "steps": result.state.step}


def dpo_step(ctx) -> Dict[str, Any]:
    """DPO on right-vs-corrupted answers, the reference being the policy's weights before the step."""
    paths = ensure_preference_data(ctx)
    cfg = stage_config(ctx, "dpo")
    cfg.data.train, cfg.data.eval = str(paths["train"]), str(paths["eval"])
    stage = build_dpo_stage(cfg, ctx.model, ctx.tokenizer)
    result = _train(cfg, ctx.model, stage, ctx.tokenizer)
    after = result.eval_metrics
    numbers = {"reward accuracy": after.get("reward_accuracy"), "reward margin": after.get("reward_margin"),
               "steps": result.state.step}
    if getattr(ctx, "reward_model", None) is not None:
        numbers["rm score"] = rm_score(ctx)
    return numbers


def rm_score(ctx) -> float:
    """Mean reward-model score of the policy's greedy completions of the held-out prompts."""
    completions = greedy_completions(ctx.model, ctx.tokenizer, ctx.eval_records,
                                     max_new_tokens=ctx.cfg.demo.max_new_tokens)
    return float(score_completions(ctx.reward_model, ctx.tokenizer, ctx.eval_records, [[c] for c in completions],
                                   max_len=ctx.cfg.data.max_len, token_budget=ctx.cfg.data.token_budget).mean())


def rm_agreement(rewards: torch.Tensor, correct: torch.Tensor) -> float:
    """Share of (right, wrong) sample pairs of one prompt that the reward model orders right over wrong."""
    right = correct[:, :, None] > correct[:, None, :]  # (M, N, N): sample i right, sample j wrong
    ordered = rewards[:, :, None] > rewards[:, None, :]
    pairs = int(right.sum())
    return float((right & ordered).sum()) / pairs if pairs else float("nan")


def _no_grad_eval(stage, model) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return stage.evaluate(model) or {}
    finally:
        model.train(was_training)


ALIGNMENT_STEPS = {"reward_model": reward_model_step, "rejection": rejection_step, "dpo": dpo_step}
