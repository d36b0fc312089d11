"""The "hf" rollout backend: batched sampling from a transformers causal LM with a KV cache.

    sampler = HFSampler(model, tokenizer)                  # fusedrl.rollout.sampling.Sampler
    groups = sampler.generate(prompts, SamplingParams(n=4, temperature=0.8, max_new_tokens=64))

or the function underneath:

    out = generate(model, prompts, max_new_tokens=64, temperature=0.8, top_p=0.95,
                   eos_token_id=tok.eos_token_id, generator=torch.Generator(device).manual_seed(0))
    out.tokens[i]    # completion ids of prompt i (no prompt), up to and including EOS / the stop string
    out.logprobs[i]  # log pi_tau(token) of each of those tokens, see below
    out.finished[i]  # True when EOS or a stop string ended it, False when max_new_tokens did

Log-probs: ``logprobs[i][t] = log softmax(logits / temperature)[token]``, the
log-probability under the policy at temperature tau over the FULL vocabulary,
before top-k / top-p truncation. That is what the trainer recomputes with
``linear_logprobs(..., temperature=tau)``, so on-policy importance ratios start
at 1. With top-k/top-p on, tokens are drawn from the truncated, renormalised
distribution, whose log-probs are larger by log(kept mass); they are not returned.
``greedy=True`` takes the argmax and reports its log-prob at ``temperature``.

Mechanics: prompts are left-padded into one (B, L) batch; a transformers
``DynamicCache`` holds keys/values; the attention mask is built here as a 4-D
additive mask, so transformers' mask code never inspects it on the host; the
next token is sampled on the device (``torch.multinomial`` with ``generator``);
finished rows keep running (their tokens are discarded) and the host is
consulted only every ``SYNC_EVERY`` steps on GPU to stop early (and to check
stop strings). Rows are independent: a prompt's completion depends on the
other prompts only through the shared random stream.
"""
from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from fusedrl.rollout.sampling import Completion, Sampler, SamplingParams, check_prompts

SYNC_EVERY = 16  # GPU: decode steps between host checks for "all rows finished"
# Attention implementations generation runs on without switching: transformers' own, and the packed
# one the trainer sets (fusedrl.models.packed_attention sends padded, cached rows to SDPA).
CACHED_ATTENTION = ("sdpa", "eager", "fusedrl_varlen")


@dataclass
class GenerationOutput:
    """Completions of ``generate``, one entry per prompt, in prompt order.

    tokens:   completion ids without the prompt, ending at and including EOS / the stop string.
    logprobs: per token, log-prob under softmax(logits / temperature) over the full
              vocabulary (before top-k/top-p), float.
    finished: True when EOS or a stop string was produced, False when cut by max_new_tokens.
    """

    tokens: List[List[int]]
    logprobs: List[List[float]]
    finished: List[bool]


def sample_next(logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int, greedy: bool,
                generator: Optional[torch.Generator]):
    """Pick the next token of each row on the device.

    Args:
        logits: (B, V) float32 next-token logits.
    Returns:
        tokens (B,) int64 and their log-probs (B,) float32 under softmax(logits / temperature).
    """
    scaled = logits / temperature
    policy_logp = torch.log_softmax(scaled, dim=-1)  # (B, V)
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = scaled
        if 0 < top_k < filtered.shape[-1]:
            kth = torch.topk(filtered, top_k, dim=-1).values[:, -1:]  # (B, 1)
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
            drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
            filtered = filtered.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(filtered, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens, policy_logp.gather(1, tokens[:, None]).squeeze(1)


def _check_args(prompts, max_new_tokens, temperature, top_p, top_k, greedy, stop_strings, tokenizer):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts: expected a non-empty list of token-id lists, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, got {prompt!r:.60}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if not greedy and not (isinstance(temperature, numbers.Real) and temperature > 0):
        raise ValueError(f"temperature: expected a number > 0 (use greedy=True for argmax), got {temperature!r}")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k!r}")
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings: need a tokenizer to decode completions, got tokenizer=None")
        if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings: expected a list of non-empty strings, got {stop_strings!r}")


def eos_token_ids(eos_token_id, tokenizer) -> List[int]:
    """The stop ids: `eos_token_id` (an int or ints) or else the tokenizer's EOS; [] when neither."""
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else list(eos_token_id)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id: expected an int or a list of ints, got {eos_token_id!r}")
    return [int(i) for i in ids]


def _uses_sliding_window(config) -> bool:
    layer_types = getattr(config, "layer_types", None) or []
    if any("sliding" in str(t) for t in layer_types):
        return True
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)


class _Masks:
    """Attention masks for left-padded rows: 4-D additive (B, 1, q, kv) built on device, no host checks.

    Models with sliding-window layers need one mask per layer type, which only
    transformers builds; they get the 2-D padding mask instead (transformers
    then inspects it on the host each step).
    """

    def __init__(self, valid: torch.Tensor, dtype: torch.dtype, use_4d: bool):
        self.valid = valid  # (B, L + max_new) bool: real prompt tokens and every generated slot
        self.use_4d = use_4d
        self.dtype = dtype
        self.blocked = torch.finfo(dtype).min

    def prefill(self, length: int) -> torch.Tensor:
        if not self.use_4d:
            return self.valid[:, :length].long()
        idx = torch.arange(length, device=self.valid.device)
        allowed = (idx[None, :] <= idx[:, None])[None] & self.valid[:, None, :length]  # (B, L, L)
        # A pad query attends to itself only, so its row is never empty (an empty row gives NaN
        # that would leak into later layers' keys/values through 0 * NaN).
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=self.valid.device)[None]
        return self._additive(allowed[:, None])

    def decode(self, kv_length: int) -> torch.Tensor:
        if not self.use_4d:
            return self.valid[:, :kv_length].long()
        return self._additive(self.valid[:, None, None, :kv_length])

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.full_like(zero, self.blocked))


def generate(model, prompts: List[List[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_token_id: Union[int, Sequence[int], None] = None,
             stop_strings: Optional[Sequence[str]] = None, tokenizer=None,
             generator: Optional[torch.Generator] = None, greedy: bool = False) -> GenerationOutput:
    """Sample completions for a batch of tokenized prompts with a KV cache.

    Args:
        model: a transformers causal LM whose attention implementation is one of
            CACHED_ATTENTION (left as found; run in eval mode, no grad, mode restored).
        prompts: token ids per prompt (e.g. from ``tokenize_prompt``), any lengths.
        max_new_tokens: most tokens generated per prompt.
        temperature: softmax temperature tau (> 0); the log-probs are under it.
        top_p: nucleus sampling mass in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; 0 is off; 1 is greedy.
        eos_token_id: an id or ids that end a completion (kept in it); default the
            tokenizer's ``eos_token_id`` when a tokenizer is given, else no EOS.
        stop_strings: strings that end a completion once its decoded text contains
            one (kept, like EOS); needs ``tokenizer``.
        tokenizer: used for stop strings and the default EOS.
        generator: a ``torch.Generator`` on the model's device, for reproducible sampling.
        greedy: take the argmax instead of sampling.

    Returns:
        ``GenerationOutput`` with completions in prompt order.
    """
    _check_args(prompts, max_new_tokens, temperature, top_p, top_k, greedy, stop_strings, tokenizer)
    eos_ids = eos_token_ids(eos_token_id, tokenizer)
    param = next(model.parameters())
    device = param.device
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in CACHED_ATTENTION:
        raise ValueError(f"model: cached generation runs on the attention implementations {CACHED_ATTENTION}, "
                         f"the model uses {impl!r}; load it with one of them")
    was_training = model.training
    model.eval()  # the attention implementation is left as found
    try:
        with torch.no_grad():
            out_tokens, out_logp, steps = _decode(
                model, prompts, device, max_new_tokens, float(temperature), float(top_p), int(top_k), greedy,
                eos_ids, list(stop_strings or []), tokenizer, generator)
    finally:
        model.train(was_training)
    return _finish(out_tokens[:, :steps].tolist(), out_logp[:, :steps].tolist(), eos_ids,
                   list(stop_strings or []), tokenizer)


def _decode(model, prompts, device, max_new_tokens, temperature, top_p, top_k, greedy, eos_ids,
            stop_strings, tokenizer, generator):
    """The decode loop; returns (tokens (B, max_new), logprobs (B, max_new), steps run)."""
    from transformers import DynamicCache

    batch, length = len(prompts), max(len(p) for p in prompts)
    pad_id = eos_ids[0] if eos_ids else 0
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    valid = torch.zeros(batch, length + max_new_tokens, dtype=torch.bool)
    valid[:, length:] = True  # every generated slot is attended to (finished rows' tokens are discarded)
    for i, prompt in enumerate(prompts):
        input_ids[i, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[i, length - len(prompt):] = True
    input_ids, valid = input_ids.to(device), valid.to(device)
    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)
    masks = _Masks(valid, next(model.parameters()).dtype, use_4d=not _uses_sliding_window(model.config))
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    out_tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    sync_every = SYNC_EVERY if device.type == "cuda" else 1

    cache = DynamicCache(config=model.config)
    positions = (torch.cumsum(valid[:, :length].long(), dim=1) - 1).clamp(min=0)
    # Only the last prompt position's logits are needed; skip the (B, L, V) rest where the model allows.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(input_ids=input_ids, attention_mask=masks.prefill(length), position_ids=positions,
                   cache=cache, use_cache=True, **keep).logits[:, -1]
    for step in range(max_new_tokens):
        tokens, logp = sample_next(logits.float(), temperature=temperature, top_p=top_p, top_k=top_k,
                                   greedy=greedy, generator=generator)
        out_tokens[:, step] = torch.where(finished, pad_id, tokens)
        out_logp[:, step] = torch.where(finished, 0.0, logp)
        if eos_ids:
            finished = finished | torch.isin(tokens, eos)
        steps = step + 1
        if steps == max_new_tokens:
            break
        if steps % sync_every == 0:
            if stop_strings:
                finished = finished | _stop_seen(out_tokens[:, :steps], finished, stop_strings, tokenizer)
            if bool(finished.all()):
                break
        kv_length = length + steps
        logits = model(input_ids=tokens[:, None], attention_mask=masks.decode(kv_length),
                       position_ids=(prompt_lens + step)[:, None], cache=cache,
                       use_cache=True).logits[:, -1]
    return out_tokens, out_logp, steps


def _stop_seen(tokens: torch.Tensor, finished: torch.Tensor, stop_strings, tokenizer) -> torch.Tensor:
    """(B,) bool: rows whose decoded completion contains a stop string (host check)."""
    rows, done = tokens.tolist(), finished.tolist()
    hit = [not d and any(s in tokenizer.decode(r, skip_special_tokens=False) for s in stop_strings)
           for r, d in zip(rows, done)]
    return torch.tensor(hit, dtype=torch.bool, device=finished.device)


def _finish(tokens, logprobs, eos_ids, stop_strings, tokenizer) -> GenerationOutput:
    """Cut each row after its first EOS or the token completing a stop string."""
    eos_set = set(eos_ids)
    out = GenerationOutput(tokens=[], logprobs=[], finished=[])
    for row, logp in zip(tokens, logprobs):
        end = next((t + 1 for t, tok in enumerate(row) if tok in eos_set), None)
        done = end is not None
        end = len(row) if end is None else end
        if stop_strings:
            stop = _stop_length(row[:end], stop_strings, tokenizer)
            if stop is not None:
                end, done = stop, True
        out.tokens.append(row[:end])
        out.logprobs.append(logp[:end])
        out.finished.append(done)
    return out


def _stop_length(row: List[int], stop_strings, tokenizer) -> Optional[int]:
    """Fewest leading tokens of ``row`` whose text contains a stop string (None if none does)."""
    def contains(n):
        text = tokenizer.decode(row[:n], skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    if not row or not contains(len(row)):
        return None
    low, high = 1, len(row)  # binary search: containment only grows with the prefix
    while low < high:
        mid = (low + high) // 2
        if contains(mid):
            high = mid
        else:
            low = mid + 1
    return low


class HFSampler(Sampler):
    """The transformers backend of `fusedrl.rollout.sampling.Sampler` ([rollout] backend = "hf").

    Samples from the trainer's own model in place (no weight sync) with `generate` above.

    Args:
        model: a transformers causal LM (see `generate`).
        tokenizer: its tokenizer (EOS when params.stop_token_ids is empty; stop strings; decoding).
        generator: a torch.Generator on the model's device to draw from (the RL stages pass their
            resumable stream); None seeds a fresh one from params.seed at each call.
        batch_size: prompts x n rows per decode batch (0: all at once).

    Differences from the interface's ideal: the rows of one call share one random stream (seeded by
    the call's seed and params.first_index), so a completion depends on what else is in the batch,
    and sampling a rollout in shares (one per rank) gives other (equally valid) completions than
    sampling it at once; min_p and logprobs_topk are not supported.
    """

    def __init__(self, model, tokenizer=None, *, generator: Optional[torch.Generator] = None, batch_size: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size: expected an int >= 0 (0 = all at once), got {batch_size!r}")
        self.model, self.tokenizer, self.generator, self.batch_size = model, tokenizer, generator, batch_size

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> List[List[Completion]]:
        if params.min_p > 0 or params.logprobs_topk > 0:
            raise ValueError(f"params: the hf backend supports neither min_p nor logprobs_topk, got min_p="
                             f"{params.min_p}, logprobs_topk={params.logprobs_topk}")
        prompts = check_prompts(prompts)
        generator = None if params.greedy else self._call_generator(params)
        if not prompts:
            return []
        rows = [p for p in prompts for _ in range(params.n)]  # prompt-major: row i * n + j
        step = self.batch_size or len(rows)
        completions: List[Completion] = []
        for start in range(0, len(rows), step):
            out = generate(self.model, rows[start:start + step], max_new_tokens=params.max_new_tokens,
                           temperature=params.temperature if not params.greedy else 1.0, top_p=params.top_p,
                           top_k=params.top_k, eos_token_id=list(params.stop_token_ids) or None,
                           stop_strings=list(params.stop_strings) or None, tokenizer=self.tokenizer,
                           generator=generator, greedy=params.greedy)
            completions += [Completion(t, lp, "stop" if done else "length")
                            for t, lp, done in zip(out.tokens, out.logprobs, out.finished)]
        return [completions[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def _call_generator(self, params: SamplingParams) -> torch.Generator:
        """This call's stream: seeded by (a seed drawn from `self.generator`, else params.seed, params.first_index).

        One draw per call from the stage's stream, so ranks that each sample their share of a rollout
        advance it alike, and shares starting at different first_index draw different numbers.
        """
        from fusedrl.rollout.native.sampler import stream_key

        g = self.generator
        seed = params.seed if g is None else int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device).item())
        device = next(self.model.parameters()).device
        return torch.Generator(device=device).manual_seed(stream_key(seed, params.first_index, 0))
