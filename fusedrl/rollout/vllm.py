"""The "vllm" rollout backend: vLLM colocated with the trainer, through vLLM's public API only.

    sampler = VLLMSampler(policy, tokenizer, config=VLLMConfig(gpu_memory_utilization=0.3))
    groups = sampler.generate(prompt_ids, SamplingParams(n=8, temperature=1.0, max_new_tokens=256, seed=step))

vLLM is an optional extra (`pip install fusedrl[vllm]`); `require_vllm()` raises a one-line
ConfigError when it is missing, and the config check calls it when `[rollout] backend = "vllm"`.

How it maps onto vLLM (documented public API):
- engine: `vllm.LLM(model=<folder with the policy's config and tokenizer>, load_format="dummy",
  distributed_executor_backend="external_launcher", enable_sleep_mode=True,
  gpu_memory_utilization=..., logprobs_mode="processed_logprobs", dtype=<the policy's dtype>)`.
  The external launcher keeps vLLM's worker in this process (one engine per trainer rank), so
  the weight push below hands it the trainer's tensors without a copy across processes.
- weights: `sync_weights()` sends the policy's `named_parameters()` to every worker with
  `LLM.collective_rpc("fusedrl_load_weights", args=(weights,))`, a method of the worker extension
  `WeightSyncWorker` (`worker_extension_cls`, as in vLLM's RLHF examples) that calls the vLLM
  model's `load_weights`; then `LLM.reset_prefix_cache()` drops KV computed with the old weights.
  `generate` pushes the weights when the policy changed since the last push (any in-place
  optimizer step bumps a parameter's version counter), so a stage needs no extra call.
- memory: after each `generate` the engine sleeps (`LLM.sleep(level)`: KV cache freed, weights
  offloaded at level 1) so that the training phase has the GPU; the next `generate` wakes it
  (`LLM.wake_up()`) and pushes the new weights.
- sampling: one vLLM `SamplingParams` per prompt (`to_vllm_kwargs`), with the prompt's own seed
  derived from (params.seed, prompt index), so a group does not depend on what else is in the batch.
  Log-probs: vLLM's `processed_logprobs` mode returns log softmax(logits / T) of the sampled token,
  the trainer's recompute, when no truncation is asked; with top-k / top-p / min-p, vLLM's processed
  log-probs are those of the TRUNCATED distribution (a notice is logged once): the RL stages
  recompute old log-probs with the trainer when they need exact ones.
- results: each `RequestOutput` becomes the prompt's n `Completion`s (`to_completions`).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from fusedrl.rollout.sampling import Completion, Sampler, SamplingParams, check_prompts

logger = logging.getLogger("fusedrl")

INSTALL_HINT = "pip install fusedrl[vllm]"
LOGPROBS_MODE = "processed_logprobs"
_SEED_MASK = (1 << 63) - 1
_WARNED = set()


def vllm_available() -> bool:
    """Whether the `vllm` package can be imported (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm(field_name: str = "rollout.backend") -> None:
    """Raise a one-line ConfigError when the vllm extra is missing."""
    if not vllm_available():
        from fusedrl.config_io import ConfigError
        from fusedrl.rollout.backends import AVAILABLE_BACKENDS

        raise ConfigError(field_name, "vllm", [b for b in AVAILABLE_BACKENDS if b != "vllm"],
                          f"{field_name}: 'vllm' needs the vllm extra, which is not installed ({INSTALL_HINT})")


@dataclass
class VLLMConfig:
    """Knobs of the vllm backend.

    gpu_memory_utilization: the fraction of the GPU vLLM may take (weights + KV) while awake.
    sleep_level: `LLM.sleep(level)` after each generate (1: offload weights to CPU and free the KV
    cache; 2: discard the weights too, cheaper since they are pushed again anyway; 0: never sleep).
    max_model_len: vLLM's context cap (None: the model config's). llm_kwargs: more `vllm.LLM` arguments.
    """

    gpu_memory_utilization: float = 0.3
    sleep_level: int = 1
    max_model_len: Optional[int] = None
    llm_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("VLLMConfig.gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization!r}")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"VLLMConfig.sleep_level must be 0, 1 or 2, got {self.sleep_level!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"VLLMConfig.max_model_len must be None or an int >= 1, got {self.max_model_len!r}")


class WeightSyncWorker:
    """vLLM worker extension (`worker_extension_cls`): load (name, tensor) pairs into the worker's model."""

    def fusedrl_load_weights(self, weights) -> int:
        self.model_runner.model.load_weights(weights=iter(weights))
        return len(weights)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The vLLM seed of prompt `prompt_index` (its n samples are vLLM's children of that seed)."""
    from fusedrl.rollout.native.sampler import stream_key

    return stream_key(seed, prompt_index, 0) & _SEED_MASK


def to_vllm_kwargs(params: SamplingParams, prompt_index: int = 0) -> Dict[str, Any]:
    """Our SamplingParams as the keyword arguments of `vllm.SamplingParams` for prompt `prompt_index`.

    Off switches (top_k 0, top_p 1, min_p 0) are left out so vLLM's own defaults apply; log-probs
    are always requested (`logprobs=0`: the sampled token's, or `logprobs_topk` more).
    """
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    kwargs: Dict[str, Any] = dict(n=params.n, temperature=float(params.temperature), max_tokens=params.max_new_tokens,
                                  logprobs=params.logprobs_topk, seed=prompt_seed(params.seed, prompt_index))
    if params.top_k:
        kwargs["top_k"] = params.top_k
    if params.top_p < 1.0:
        kwargs["top_p"] = float(params.top_p)
    if params.min_p > 0.0:
        kwargs["min_p"] = float(params.min_p)
    if params.stop_token_ids:
        kwargs["stop_token_ids"] = list(params.stop_token_ids)
    if params.stop_strings:
        kwargs["stop"] = list(params.stop_strings)
    else:
        kwargs["detokenize"] = False
    return kwargs


def truncates(params: SamplingParams) -> bool:
    """Whether vLLM's processed log-probs differ from the full-vocabulary ones for these params."""
    return not params.greedy and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)


def _position_logprobs(entry, token: int, topk: int, where: str):
    """(logprob of `token`, top-k pairs or None) from one position's {token_id: Logprob} mapping."""
    if entry is None or token not in entry:
        raise ValueError(f"{where}: vLLM returned no log-prob for the sampled token {token}")

    def value(lp):
        return float(getattr(lp, "logprob", lp))

    top = None
    if topk:
        ranked = sorted(entry.items(), key=lambda kv: -value(kv[1]))[:topk]
        top = [(int(t), value(lp)) for t, lp in ranked]
    return value(entry[token]), top


def to_completions(output, params: SamplingParams, where: str = "request") -> List[Completion]:
    """One vLLM `RequestOutput` (duck-typed: .outputs of CompletionOutput with .index, .token_ids,
    .logprobs, .finish_reason) as params.n Completions in sample order."""
    outs = sorted(output.outputs, key=lambda o: o.index)
    if len(outs) != params.n or [o.index for o in outs] != list(range(params.n)):
        raise ValueError(f"{where}: expected {params.n} completions indexed 0..{params.n - 1}, "
                         f"got indices {[o.index for o in outs]}")
    completions = []
    for o in outs:
        tokens = [int(t) for t in o.token_ids]
        if o.finish_reason not in ("stop", "length"):
            raise ValueError(f"{where}[{o.index}]: unexpected finish_reason {o.finish_reason!r}")
        if o.logprobs is None or len(o.logprobs) != len(tokens):
            raise ValueError(f"{where}[{o.index}]: {len(tokens)} tokens but "
                             f"{None if o.logprobs is None else len(o.logprobs)} log-prob entries")
        pairs = [_position_logprobs(e, t, params.logprobs_topk, f"{where}[{o.index}]")
                 for e, t in zip(o.logprobs, tokens)]
        top = [p[1] for p in pairs] if params.logprobs_topk else None
        completions.append(Completion(tokens, [p[0] for p in pairs], o.finish_reason, top))
    return completions


def _default_launcher_env() -> None:
    """A single-process torch.distributed environment for the external launcher when not under torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def _param_versions(model) -> tuple:
    return tuple((id(p), p._version) for p in model.parameters())


class VLLMSampler(Sampler):
    """The vllm backend of `fusedrl.rollout.sampling.Sampler` ([rollout] backend = "vllm").

    Args:
        model: the trainer's transformers causal LM (its config, dtype and parameters are used).
        tokenizer: saved next to the config for vLLM; its EOS ends completions when params name no stop.
        config: VLLMConfig. llm: an existing `vllm.LLM`-like engine (tests, or a user-built one); when
            given, nothing is saved and `vllm` is imported only for its SamplingParams.
        vllm_module: the module providing `SamplingParams` / `LLM` (default: `import vllm`).
    """

    def __init__(self, model, tokenizer, *, config: Optional[VLLMConfig] = None, llm=None, vllm_module=None,
                 generator: Optional[torch.Generator] = None):
        from fusedrl.rollout.hf import eos_token_ids

        if vllm_module is None:
            require_vllm()
            vllm_module = importlib.import_module("vllm")
        self.vllm, self.model, self.tokenizer, self.generator = vllm_module, model, tokenizer, generator
        self.config = config or VLLMConfig()
        self.eos_ids = tuple(eos_token_ids(None, tokenizer))
        self._folder = None
        self.llm = llm if llm is not None else self._build_llm()
        self.asleep = False
        self._pushed = None  # parameter versions at the last push (None: never pushed)

    def _build_llm(self):
        self._folder = tempfile.TemporaryDirectory(prefix="fusedrl-vllm-")
        self.model.config.save_pretrained(self._folder.name)
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(self._folder.name)
        _default_launcher_env()
        cfg = self.config
        kwargs = dict(model=self._folder.name, load_format="dummy", distributed_executor_backend="external_launcher",
                      enable_sleep_mode=cfg.sleep_level > 0, gpu_memory_utilization=cfg.gpu_memory_utilization,
                      logprobs_mode=LOGPROBS_MODE, dtype=str(self.model.dtype).replace("torch.", ""),
                      worker_extension_cls=f"{__name__}.WeightSyncWorker", tensor_parallel_size=1)
        if cfg.max_model_len:
            kwargs["max_model_len"] = cfg.max_model_len
        if self.tokenizer is None:  # token ids in and out; stop strings then cannot be used
            kwargs["skip_tokenizer_init"] = True
        kwargs.update(cfg.llm_kwargs)
        return self.vllm.LLM(**kwargs)

    # --- the Sampler interface ----------------------------------------------------------------
    def sync_weights(self) -> None:
        """Push the policy's parameters into vLLM (in place on its worker) and drop its prefix cache."""
        self.wake()
        weights = [(name, p.detach()) for name, p in self.model.named_parameters()]
        self.llm.collective_rpc("fusedrl_load_weights", args=(weights,))
        self.llm.reset_prefix_cache()
        self._pushed = _param_versions(self.model)

    def sleep(self) -> None:
        if self.config.sleep_level and not self.asleep:
            self.llm.sleep(level=self.config.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _vllm_params(self, prompts: List[List[int]], params: SamplingParams):
        if not params.stop_token_ids and self.eos_ids:
            params = dataclasses.replace(params, stop_token_ids=self.eos_ids)
        if truncates(params) and "truncated" not in _WARNED:
            _WARNED.add("truncated")
            logger.info("rollout: vllm returns log-probs of the top-k/top-p/min-p truncated distribution "
                        "(its processed_logprobs mode), not the full-vocabulary ones the trainer recomputes")
        return [self.vllm.SamplingParams(**to_vllm_kwargs(params, i)) for i in range(len(prompts))], params

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> List[List[Completion]]:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompts = check_prompts(prompts, getattr(self.model.config, "vocab_size", None))
        if self.generator is not None and not params.greedy:
            g = self.generator
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device).item())
            params = dataclasses.replace(params, seed=seed)
        self.wake()
        if self._pushed != _param_versions(self.model):
            self.sync_weights()
        vllm_params, params = self._vllm_params(prompts, params)
        requests = [{"prompt_token_ids": p} for p in prompts]
        outputs = self.llm.generate(requests, vllm_params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(prompts)} prompts")
        groups = [to_completions(out, params, f"prompts[{i}]") for i, out in enumerate(outputs)]
        self.sleep()
        return groups
