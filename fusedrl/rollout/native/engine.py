"""The native rollout engine: `NativeEngine(model).generate(prompts, params)` (a `Sampler`).

    engine = NativeEngine(policy, tokenizer=tok, config=EngineConfig(block_size=16))
    groups = engine.generate(prompt_ids, SamplingParams(n=8, temperature=1.0, max_new_tokens=256, seed=step))
    engine.sleep(); train(...); engine.wake()      # release / re-take the KV pool around training

It reads the policy's parameters in place (no copy): `sync_weights()` is a no-op and an optimizer
step is seen by the next `generate`. Models it cannot run raise `UnsupportedModelError` (a
NotImplementedError) from the constructor; callers fall back to the `hf` backend.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..sampling import Completion, Sampler, SamplingParams, check_prompts
from .block_manager import BlockManager
from .model import NativeCausalLM, UnsupportedModelError
from .model_runner import ModelRunner
from .sampler import TokenSampler, stream_key
from .scheduler import Scheduler
from .sequence import Sequence

__all__ = ["EngineConfig", "NativeEngine", "UnsupportedModelError"]


@dataclass
class EngineConfig:
    """Knobs of the native engine.

    block_size: tokens per KV page. KV pool: `num_blocks` pages, else `max_num_tokens` tokens, else on
    CUDA `memory_fraction` of the device memory minus what is allocated, on CPU just enough for the
    request (every sequence at full length). max_num_batched_tokens: token budget of one forward
    (decode tokens + prefill chunks); max_num_seqs: sequences decoding at once. sync_every: decode
    steps run on the device between host syncs (default 1 on CPU, 8 on CUDA). cuda_graphs: capture
    the decode step per bucketed batch size (CUDA only). decode_backend: paged_decode_attention's backend.
    """

    block_size: int = 16
    num_blocks: Optional[int] = None
    max_num_tokens: Optional[int] = None
    memory_fraction: float = 0.3
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 256
    sync_every: Optional[int] = None
    cuda_graphs: bool = True
    graph_max_batch: int = 256
    decode_backend: Optional[str] = None

    def __post_init__(self):
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "graph_max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("num_blocks", "max_num_tokens", "sync_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be None or an int >= 1, got {value!r}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"EngineConfig.memory_fraction must be in (0, 1], got {self.memory_fraction!r}")


class NativeEngine(Sampler):
    def __init__(self, model, *, tokenizer=None, config: Optional[EngineConfig] = None):
        self.config = config or EngineConfig()
        self.model = NativeCausalLM(model, decode_backend=self.config.decode_backend)
        self.tokenizer = tokenizer
        self.runner = ModelRunner(self.model, self.config.block_size, cuda_graphs=self.config.cuda_graphs,
                                  graph_max_batch=self.config.graph_max_batch)
        on_cuda = self.runner.device.type == "cuda"
        self.sync_every = self.config.sync_every or (8 if on_cuda else 1)
        self.asleep = False
        self.stats: dict = {}
        self.block_manager: Optional[BlockManager] = None  # the pool bookkeeping of the latest generate

    # --- KV pool sizing -----------------------------------------------------------------------
    def _pool_blocks(self, prompts: List[List[int]], params: SamplingParams) -> int:
        """Pages of the pool for this request; an allocated pool is kept when it is large enough."""
        cfg, bs, have = self.config, self.config.block_size, self.runner.num_blocks if self.runner.kv else 0
        if cfg.num_blocks:
            return cfg.num_blocks
        if cfg.max_num_tokens:
            return -(-cfg.max_num_tokens // bs)
        if self.runner.device.type == "cuda":
            if have:
                return have
            free, total = torch.cuda.mem_get_info(self.runner.device)
            budget = min(free, cfg.memory_fraction * total - torch.cuda.memory_allocated(self.runner.device))
            blocks = int(budget // self.runner.bytes_per_block())
            if blocks < 1:
                raise RuntimeError(f"memory_fraction={cfg.memory_fraction} leaves no room for the KV pool")
            return blocks
        full = sum(-(-len(p) // bs) + params.n * -(-(len(p) + params.max_new_tokens) // bs) for p in prompts)
        return max(full, have)

    def _ensure_pool(self, blocks: int) -> None:
        if self.runner.num_blocks != blocks or not self.runner.kv:
            self.runner.allocate(blocks)

    # --- the Sampler interface ----------------------------------------------------------------
    def sleep(self) -> None:
        """Free the KV pool (and captured graphs); the next generate (or wake) re-allocates it."""
        self.runner.release()
        self.asleep = True

    def wake(self) -> None:
        """Re-take the KV pool now when its size does not depend on the request (CUDA, or a fixed size)."""
        self.asleep = False
        if not self.runner.kv:
            blocks = self._pool_blocks([], SamplingParams())
            if blocks:
                self._ensure_pool(blocks)

    def sync_weights(self) -> None:
        """No-op: the engine reads the policy's parameters in place."""

    def _check_stop(self, params: SamplingParams):
        stop_ids = set(params.stop_token_ids)
        strings = params.stop_strings
        if strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop_strings needs a tokenizer: NativeEngine(model, tokenizer=...)")
        tail = max((len(s) for s in strings), default=0) + 8

        def check(seq: Sequence) -> Optional[str]:
            if seq.token_ids[-1] in stop_ids:
                return "stop"
            if strings:
                text = self.tokenizer.decode(seq.completion_ids[-tail:], skip_special_tokens=False)
                if any(s in text for s in strings):
                    return "stop"
            return None
        return check

    def generate(self, prompts: List[List[int]], params: SamplingParams) -> List[List[Completion]]:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompts = check_prompts(prompts, self.model.vocab_size)
        for p in prompts:
            self.model.check_length(len(p) + params.max_new_tokens)
        check_stop = self._check_stop(params)
        cfg = self.config
        blocks = BlockManager(self._pool_blocks(prompts, params), cfg.block_size)
        longest = max(len(p) for p in prompts) + params.max_new_tokens
        if blocks.blocks_for(longest) > blocks.num_blocks:
            raise ValueError(f"the KV pool ({blocks.num_blocks} blocks of {cfg.block_size}) cannot hold one sequence "
                             f"of {longest} tokens (prompt + max_new_tokens); raise num_blocks / max_num_tokens")
        self._ensure_pool(blocks.num_blocks)
        self.block_manager = blocks
        self.asleep = False
        seed, first = params.seed, params.first_index

        def make_child(prompt: Sequence, j: int) -> Sequence:
            return prompt.fork(j, stream_key(seed, first + prompt.prompt_index, j))

        sched = Scheduler(blocks, max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                          lookahead=self.sync_every, n=params.n, make_child=make_child)
        for i, p in enumerate(prompts):
            sched.add(Sequence(i, p, params.max_new_tokens))
        sampler = TokenSampler(params)
        start, steps, forwards = time.perf_counter(), 0, 0
        with torch.no_grad():
            while not sched.done:
                batch = sched.schedule()
                self.runner.copy_blocks(batch.copies)
                if batch.steps > 1:
                    decode_out, prefill_out = self.runner.run_window(batch, sampler, params.stop_token_ids), []
                else:
                    decode_out, prefill_out = self.runner.run_mixed(batch, sampler)
                sched.postprocess(batch, decode_out, prefill_out, check_stop)
                steps += 1
                forwards += batch.steps
        self.stats = {"seconds": time.perf_counter() - start, "steps": steps, "forwards": forwards,
                      "preemptions": sched.num_preemptions, "prefill_tokens": sched.num_prefilled,
                      "preempted_tokens": sum(t for t, _ in sched.preempted),
                      "prefix_hit_tokens": sum(k for _, k in sched.preempted),
                      "peak_blocks": blocks.peak_used,
                      "num_blocks": blocks.num_blocks,
                      "new_tokens": sum(s.num_completion for s in sched.finished)}
        return self._collect(sched.finished, len(prompts), params)

    @staticmethod
    def _collect(finished: List[Sequence], num_prompts: int, params: SamplingParams) -> List[List[Completion]]:
        groups: List[List[Optional[Completion]]] = [[None] * params.n for _ in range(num_prompts)]
        for seq in finished:
            top = seq.top_logprobs if params.logprobs_topk else None
            groups[seq.prompt_index][seq.sample_index] = Completion(seq.completion_ids, seq.logprobs,
                                                                    seq.finish_reason, top)
        return groups
