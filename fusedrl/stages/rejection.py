"""Rejection sampling (best-of-N fine-tuning) and best-of-N at inference.

Sample N completions for each of M prompts with the policy, score them with a
reward model (`ScalarHeadModel`) or a verifier (``fn(prompt, completion, **fields)``
named ``module:function``) into R (M x N), select

    best_per_prompt   argmax of each row of R                        -> M samples
    top_k             the k largest entries of R: flat index f -> (f // N, f % N)
    random            a uniformly random selection of the same size (the baseline)

(ties go to the lower index), then fine-tune on the selection with the SFT
objective (this stage is an `SFTStage` over the selected examples). Samples and
scores are cached as JSON under ``rejection.cache_dir``, keyed by a hash of the
sampling settings, the policy's weights and the prompts (scores also by the
scorer), so a resumed or repeated run samples nothing twice.

Under torchrun the sampling and the scoring are divided across ranks (`divided_rows`: rank r
takes the contiguous share `rank_prompts(M, r, world)`, the shares are all-gathered), rank 0
alone reads and writes the cache (the others get its content by broadcast and wait for its
writes at a barrier). With the native engine the samples are the one-process samples.

    fusedrl train CONFIG.toml     # [run] stage = "rejection"; a Qwen2-0.5B example: docs/alignment_stages.md
    texts, scores = best_of_n(model, tokenizer, records, scorer, n=8, max_new_tokens=64)
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch

from fusedrl.config import ConfigError
from fusedrl.data.records import Example, PackedDataset, load_records, tokenize_prompt, tokenize_sft
from fusedrl.rollout.completions import DEFAULT_BACKEND, make_sampler, rank_prompts, sample_texts
from fusedrl.rollout.sampling import SamplingParams
from fusedrl.rollout.rewards import load_verifier, reward_model_scores
from fusedrl.rollout.rewards import score_completions as verifier_scores
from fusedrl.models.scalar_head import ScalarHeadModel
from fusedrl.stages.configs_alignment import RejectionConfig, SELECTIONS, check_section
from fusedrl.stages.cache import content_key, load_json, model_fingerprint, path_fingerprint, save_json
from fusedrl.stages.sft import SFTStage

logger = logging.getLogger("fusedrl")
Scorer = Union[ScalarHeadModel, Callable[..., float]]


# ----------------------------------------------------------------------------- selection

def _check_rewards(rewards: torch.Tensor) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards: expected a non-empty (M, N) tensor, got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")


def select_best_per_prompt(rewards: torch.Tensor) -> torch.Tensor:
    """(M, 2) int64 (row, column) of each row's best sample (first one on ties)."""
    _check_rewards(rewards)
    rows = torch.arange(rewards.shape[0])
    return torch.stack([rows, rewards.argmax(dim=1).cpu()], dim=1)


def select_top_k(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(k, 2) int64 (row, column) of the k largest rewards overall, best first (lower flat index on ties)."""
    _check_rewards(rewards)
    m, n = rewards.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m * n:
        raise ValueError(f"k: expected an int in [1, {m * n}] (M x N samples), got {k!r}")
    order = torch.argsort(rewards.reshape(-1).cpu(), descending=True, stable=True)[:k]
    return torch.stack([order // n, order % n], dim=1)


def select_random(num_prompts: int, num_samples: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """(size, 2) int64 (row, column) of ``size`` distinct samples drawn uniformly (seeded)."""
    if not 1 <= size <= num_prompts * num_samples:
        raise ValueError(f"size: expected an int in [1, {num_prompts * num_samples}], got {size!r}")
    flat = torch.randperm(num_prompts * num_samples, generator=torch.Generator().manual_seed(seed))[:size]
    return torch.stack([flat // num_samples, flat % num_samples], dim=1)


def select(rewards: torch.Tensor, selection: str, *, top_k: int = 0, seed: int = 0) -> torch.Tensor:
    """The (S, 2) selection of ``selection`` (see the module docstring); top_k = 0 means M."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection: expected one of {SELECTIONS}, got {selection!r}")
    if selection == "best_per_prompt":
        return select_best_per_prompt(rewards)
    size = top_k or rewards.shape[0]
    if selection == "top_k":
        return select_top_k(rewards, size)
    return select_random(rewards.shape[0], rewards.shape[1], size, seed=seed)


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_completions(scorer: Scorer, tokenizer, records: List[dict], completions: List[List[str]], *,
                      max_len: int = 1024, token_budget: int = 4096) -> torch.Tensor:
    """R (M, N) float32 on the CPU: the score of completion j of prompt i.

    A ``ScalarHeadModel`` scores each prompt + completion rendered with the chat template (as
    its training pairs were) through `fusedrl.rollout.rewards.reward_model_scores`; a verifier
    is called through `fusedrl.rollout.rewards.score_completions` as fn(prompt, completion,
    **the record's other fields).
    """
    m, n = len(completions), len(completions[0]) if completions else 0
    if not isinstance(scorer, ScalarHeadModel):
        if not callable(scorer):
            raise TypeError(f"scorer: expected a ScalarHeadModel or a callable, got {type(scorer).__name__}")
        flat_records = [r for r, row in zip(records, completions) for _ in row]
        flat = [c for row in completions for c in row]
        scores = verifier_scores(scorer, [str(r["prompt"]) for r in flat_records], flat, flat_records,
                                 name="rejection.verifier")
        return scores.reshape(m, n)
    examples = [_scoring_example(r["prompt"], c, tokenizer, max_len) for r, row in zip(records, completions)
                for c in row]
    return reward_model_scores(scorer, examples, token_budget).reshape(m, n)


def _scoring_example(prompt, completion: str, tokenizer, max_len: int) -> Example:
    example = tokenize_sft({"prompt": prompt, "completion": completion}, tokenizer, max_len=max_len)
    if example is None:  # the completion fell past max_len: score the (truncated) prompt alone
        ids = tokenize_sft({"prompt": prompt, "completion": completion}, tokenizer, max_len=10 ** 9).input_ids
        example = Example(ids[:max_len], ids[:max_len])
    return example


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_completions(model, tokenizer, records: List[dict], *, num_samples: int, max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 64,
                       seed: int = 0, backend: str = DEFAULT_BACKEND, first_index: int = 0) -> List[List[str]]:
    """N sampled completions (decoded text, special tokens skipped) per record's prompt: (M, N) nested lists.

    Through the rollout Sampler (`fusedrl.rollout.completions.sample_texts`), `batch_size` rows per decode
    batch, one random stream seeded by `seed`. `first_index`: the global index of records[0] (the native
    engine seeds completion j of prompt i from (seed, first_index + i, j), so a share of the prompts sampled
    with its first index gets the completions sampling all of them gives it).
    """
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    sampler = make_sampler(backend, model, tokenizer, generator=generator, batch_size=batch_size)
    params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
                            max_new_tokens=max_new_tokens, seed=seed, first_index=first_index)
    return sample_texts(sampler, tokenizer, records, params)


def best_of_n(model, tokenizer, records: List[dict], scorer: Scorer, *, n: int, max_new_tokens: int,
              temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
              max_len: int = 1024, token_budget: int = 4096):
    """Best-of-N at inference: for each record, the best of ``n`` samples and its score.

    Returns:
        (texts: list of M str, scores: (M,) float32).
    """
    completions = sample_completions(model, tokenizer, records, num_samples=n, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    rewards = score_completions(scorer, tokenizer, records, completions, max_len=max_len, token_budget=token_budget)
    best = select_best_per_prompt(rewards)
    return [completions[i][j] for i, j in best.tolist()], rewards[best[:, 0], best[:, 1]]


# ----------------------------------------------------------------------------- the stage

@dataclass
class RejectionResult:
    """What one rejection-sampling round produced."""

    completions: List[List[str]]  # (M, N)
    rewards: torch.Tensor  # (M, N) float32
    selected: torch.Tensor  # (S, 2) int64 (row, column) used for training
    baseline: torch.Tensor  # (S, 2) a random selection of the same size, for comparison
    cache_key: str

    def mean_reward(self, which: torch.Tensor) -> float:
        return float(self.rewards[which[:, 0], which[:, 1]].mean())


def _world_rank():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def divided_rows(fn: Callable[[int, int], list], num_rows: int) -> list:
    """`fn(lo, hi)` (the rows of prompts [lo, hi)) run on this rank's share of the prompts, all shares gathered.

    Under a process group rank r computes `rank_prompts(num_rows, r, world)` (contiguous, equal to
    within one prompt) and `all_gather_object` gives every rank all rows in prompt order; without one
    (or at world size 1) it is `fn(0, num_rows)`.
    """
    import torch.distributed as dist

    world, rank = _world_rank()
    if world == 1:
        return fn(0, num_rows)
    lo, hi = rank_prompts(num_rows, rank, world)
    mine = fn(lo, hi) if hi > lo else []
    parts: List[Optional[list]] = [None] * world
    dist.all_gather_object(parts, mine)
    return [row for part in parts for row in part]


def _load_shared(path: Path):
    """A cache file read by rank 0 and broadcast (every rank takes the same branch: sample or not)."""
    import torch.distributed as dist

    world, rank = _world_rank()
    value = load_json(path) if rank == 0 else None
    if world > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def _save_shared(path: Path, value) -> None:
    """Rank 0 alone writes the cache file; the others wait for it (a barrier)."""
    import torch.distributed as dist

    world, rank = _world_rank()
    if rank == 0:
        save_json(path, value)
    if world > 1:
        dist.barrier()


def rejection_sample(model, tokenizer, records: List[dict], scorer: Scorer, cfg: RejectionConfig, *, seed: int,
                     cache_dir=None, scorer_identity=None, max_len: int = 1024,
                     token_budget: int = 4096) -> RejectionResult:
    """Sample, score (both cached on disk when ``cache_dir`` is set) and select."""
    sampling = {"num_samples": cfg.num_samples, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "top_k": cfg.top_k_sampling, "seed": seed}
    key = content_key({"sampling": sampling, "model": model_fingerprint(model),
                       "prompts": [tokenize_prompt({"prompt": r["prompt"]}, tokenizer) for r in records]})
    folder = Path(cache_dir) if cache_dir is not None else None
    samples = _load_shared(folder / f"samples_{key}.json") if folder else None
    if samples is None or len(samples) != len(records):
        start = time.perf_counter()
        samples = divided_rows(lambda lo, hi: sample_completions(
            model, tokenizer, records[lo:hi], batch_size=cfg.sample_batch_size, first_index=lo, **sampling),
            len(records))
        world, rank = _world_rank()
        lo, hi = (0, len(records)) if world == 1 else rank_prompts(len(records), rank, world)
        logger.info("rejection: sampled %d x %d completions in %.1fs (%d prompts on this rank)", len(records),
                    cfg.num_samples, time.perf_counter() - start, hi - lo)
        if folder:
            _save_shared(folder / f"samples_{key}.json", samples)
    if scorer_identity is None:
        scorer_identity = (model_fingerprint(scorer) if isinstance(scorer, ScalarHeadModel)
                           else f"{getattr(scorer, '__module__', '?')}:{getattr(scorer, '__qualname__', repr(scorer))}")
    score_key = content_key({"samples": key, "scorer": scorer_identity, "fields": [{k: v for k, v in r.items() if k not in ("prompt", "completion")} for r in records]})
    scores = _load_shared(folder / f"scores_{score_key}.json") if folder else None
    if scores is None:
        scores = divided_rows(lambda lo, hi: score_completions(
            scorer, tokenizer, records[lo:hi], samples[lo:hi], max_len=max_len, token_budget=token_budget).tolist(),
            len(records))
        if folder:
            _save_shared(folder / f"scores_{score_key}.json", scores)
    rewards = torch.tensor(scores, dtype=torch.float32)
    selected = select(rewards, cfg.selection, top_k=cfg.top_k, seed=seed)
    baseline = select_random(rewards.shape[0], rewards.shape[1], selected.shape[0], seed=seed + 1)
    return RejectionResult(samples, rewards, selected, baseline, score_key)


def selection_examples(result: RejectionResult, records: List[dict], tokenizer, *, max_len: int,
                       which: str = "selected") -> List[Example]:
    """SFT examples (prompt masked) of the selected (or the random baseline) samples."""
    chosen = result.selected if which == "selected" else result.baseline
    examples = []
    for i, j in chosen.tolist():
        example = tokenize_sft({"prompt": records[i]["prompt"], "completion": result.completions[i][j]}, tokenizer,
                               max_len=max_len)
        if example is not None:
            examples.append(example)
    return examples


class RejectionSamplingStage(SFTStage):
    """SFT on a rejection-sampling selection; reports the selection's and the random baseline's mean reward."""

    name = "rejection"

    def __init__(self, dataset: PackedDataset, result: RejectionResult, **kwargs):
        super().__init__(dataset, **kwargs)
        self.result = result
        self.selected_reward = result.mean_reward(result.selected)
        self.random_reward = result.mean_reward(result.baseline)
        self.sample_reward = float(result.rewards.mean())

    def host_metrics(self) -> Dict[str, float]:
        return {**super().host_metrics(), "selected_reward": self.selected_reward,
                "random_reward": self.random_reward, "sample_reward": self.sample_reward}


def build_scorer(cfg: RejectionConfig, device) -> Scorer:
    """The reward model (loaded as a ScalarHeadModel, eval mode) or the verifier function of the config."""
    if cfg.verifier is not None:
        return load_verifier(cfg.verifier, what="rejection.verifier")
    return ScalarHeadModel.from_pretrained(cfg.reward_model, device=device).eval()


def build_rejection_stage(cfg, model, tokenizer, *, scorer: Optional[Scorer] = None) -> RejectionSamplingStage:
    """Sample with ``model`` (the policy, before training), score, select, and build the SFT stage on the selection.

    ``scorer`` overrides the config's reward model / verifier (the demo passes its in-memory RM).
    """
    rs_cfg = getattr(cfg, "rejection", None)
    if rs_cfg is None:
        raise ConfigError.message("rejection", "rejection: the config has no [rejection] table "
                         "(use fusedrl.stages.configs_alignment.AlignmentTrainConfig)")
    check_section(rs_cfg, "rejection", require_scorer=scorer is None)
    data = cfg.data
    if not data.train:
        raise ConfigError.message("data.train", "data.train: the rejection stage needs a prompt file (set data.train)")
    records = load_records(data.train)
    if rs_cfg.max_prompts:
        records = records[:rs_cfg.max_prompts]
    device = next(model.parameters()).device
    own_scorer = scorer is None
    scorer = build_scorer(rs_cfg, device) if own_scorer else scorer
    cache_dir = rs_cfg.cache_dir or str(Path(cfg.run.out_dir) / "rejection_cache")
    identity = None
    if own_scorer:
        identity = rs_cfg.verifier or path_fingerprint(rs_cfg.reward_model)
    result = rejection_sample(model, tokenizer, records, scorer, rs_cfg, seed=cfg.run.seed, cache_dir=cache_dir,
                              scorer_identity=identity, max_len=data.max_len, token_budget=data.token_budget)
    if own_scorer:
        del scorer  # the reward model is not needed while the policy trains
        gc.collect()
    examples = selection_examples(result, records, tokenizer, max_len=data.max_len)
    if not examples:
        raise ValueError("rejection: no selected sample is left to train on (all dropped by data.max_len)")
    logger.info("rejection: %d samples selected (%s); mean reward selected %.3f, random %.3f, all %.3f",
                len(examples), rs_cfg.selection, result.mean_reward(result.selected),
                result.mean_reward(result.baseline), float(result.rewards.mean()))
    dataset = PackedDataset(examples, data.token_budget, seed=cfg.run.seed, shuffle=data.shuffle)
    return RejectionSamplingStage(dataset, result, micro_batches_per_step=data.micro_batches_per_step,
                                  normalize_by=cfg.sft.normalize_by)
