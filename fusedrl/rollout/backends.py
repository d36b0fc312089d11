"""The rollout backends behind `[rollout] backend`, built by one function.

    sampler = make_sampler("native", model, tokenizer, generator=g)   # the default
    sampler = make_sampler("hf", model, tokenizer, generator=g)       # transformers, the test oracle

"native" (fusedrl.rollout.native: paged KV shared by a group's samples, continuous batching) runs
Llama, Qwen2, Qwen3 and Mistral models; any other model falls back to "hf" with a one-line notice.
Both read the trainer's parameters in place, so no weight sync is needed. "vllm" (the optional
`vllm` extra, fusedrl.rollout.vllm) runs vLLM colocated in this process: one engine per model, kept
across calls, asleep between rollouts, with the policy's weights pushed when they changed.

The stages give every backend the same two things: the tokenizer (EOS ends a completion when the
params name no stop token) and their resumable random stream `generator`. Both backends draw one
seed from that stream at each call (consecutive rollouts differ, and a resumed run, which restores
the generator, samples the same completions; ranks that each sample a share of one rollout advance
it alike). The native engine derives each completion's stream from (seed, params.first_index +
prompt, sample), so a rollout sampled in shares equals the rollout sampled at once; the hf backend
seeds one stream for the call's rows from (seed, params.first_index).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Sequence

import torch

from fusedrl.rollout.hf import HFSampler, eos_token_ids
from fusedrl.rollout.sampling import Completion, Sampler, SamplingParams

logger = logging.getLogger("fusedrl")

BACKENDS = ("native", "hf", "vllm")
AVAILABLE_BACKENDS = ("native", "hf", "vllm")  # "vllm" needs the vllm extra (checked at load time)
DEFAULT_BACKEND = "native"
_NOTIFIED = set()  # model classes already reported as falling back to hf
_VLLM = {}  # id(model) -> its VLLMSampler (a vLLM engine is built once per model and kept)


class NativeSampler(Sampler):
    """`fusedrl.rollout.native.NativeEngine` with the stages' conventions (EOS default, seed from a stream)."""

    def __init__(self, engine, tokenizer, generator: Optional[torch.Generator] = None):
        self.engine, self.generator = engine, generator
        self.eos_ids = tuple(eos_token_ids(None, tokenizer))

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> List[List[Completion]]:
        changes = {}
        if not params.stop_token_ids and self.eos_ids:
            changes["stop_token_ids"] = self.eos_ids
        if self.generator is not None and not params.greedy:
            g = self.generator
            changes["seed"] = int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device).item())
        if not len(prompts):  # an empty share of a divided rollout: the stream advanced like the other ranks'
            return []
        return self.engine.generate(prompts, dataclasses.replace(params, **changes) if changes else params)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    @property
    def stats(self) -> dict:
        return dict(getattr(self.engine, "stats", {}) or {})


def make_sampler(backend: str, model, tokenizer, *, generator: Optional[torch.Generator] = None,
                 batch_size: int = 0) -> Sampler:
    """The rollout backend named by [rollout] backend, sampling from `model` in place.

    Args:
        backend: "native", "hf" or "vllm" (needs the vllm extra: a one-line ConfigError without it).
        generator: the stage's resumable random stream on the model's device (None: params.seed).
        batch_size: hf only, prompts x n rows per decode batch (0 = all at once); the native
            engine batches continuously under its own token budget.
    """
    if backend not in AVAILABLE_BACKENDS:
        raise ValueError(f"rollout.backend: {backend!r} is not available in this build; expected one of "
                         f"{list(AVAILABLE_BACKENDS)} (known: {list(BACKENDS)})")
    if backend == "vllm":
        return _vllm_sampler(model, tokenizer, generator)
    if backend == "native":
        from fusedrl.rollout.native import NativeEngine, UnsupportedModelError

        try:
            return NativeSampler(NativeEngine(model, tokenizer=tokenizer), tokenizer, generator)
        except UnsupportedModelError as err:
            name = type(model).__name__
            if name not in _NOTIFIED:
                _NOTIFIED.add(name)
                logger.info("rollout: the native engine cannot run %s (%s); using the hf backend", name, err)
    return HFSampler(model, tokenizer, generator=generator, batch_size=batch_size)


def _vllm_sampler(model, tokenizer, generator):
    from fusedrl.rollout.vllm import VLLMSampler, require_vllm

    require_vllm()
    sampler = _VLLM.get(id(model))
    if sampler is None or sampler.model is not model:
        sampler = _VLLM[id(model)] = VLLMSampler(model, tokenizer, generator=generator)
    sampler.generator = generator
    return sampler
