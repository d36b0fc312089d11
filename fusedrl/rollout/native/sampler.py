"""Next-token sampling on the device, with one counter-based random stream per completion.

Completion j of prompt i draws from the stream `stream_key(seed, i, j)`; its t-th token uses the
uniform u = hash(stream, t) (a 32-bit integer hash evaluated on the device), so a completion is a
function of its seed, its indices and the weights, whatever else shares the batch, and no
generator state lives on the host. A token is drawn by inversion: the first v whose cumulative
probability exceeds u * total under q, the truncated distribution softmax(logits / T) after
top-k, top-p and min-p (so v is drawn with probability q_v; truncated tokens never). Greedy
(T = 0) takes the argmax.

Log-probs: log softmax(logits / T) of the sampled token over the FULL vocabulary, before
truncation (T = 1 when greedy), what the trainer's `linear_logprobs(..., temperature=T)` gives.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..sampling import SamplingParams

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors holding 32-bit values, without int64 overflow."""
    hi = ((x >> 16) * c) & 0xFFFF
    return ((hi << 16) + (x & 0xFFFF) * c) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def stream_key(seed: int, prompt_index: int, sample_index: int) -> int:
    """The 64-bit stream of completion `sample_index` of prompt `prompt_index` under `seed` (host ints)."""
    key = _splitmix64(seed & 0xFFFFFFFFFFFFFFFF)
    key = _splitmix64(key ^ prompt_index)
    return _splitmix64(key ^ (sample_index * 0x632BE59BD9B4E019 & 0xFFFFFFFFFFFFFFFF))


def as_int64(key: int) -> int:
    """A 64-bit unsigned key as the signed int64 torch stores (same bits)."""
    return key - (1 << 64) if key >= (1 << 63) else key


def uniforms(streams: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) float32 uniforms in (0, 1): row b is stream streams[b] at counter steps[b]."""
    lo, hi = streams & _M32, (streams >> 32) & _M32
    bits = mix32(mix32(mix32(lo ^ mix32(steps & _M32)) ^ hi) ^ 0x5BD1E995)
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def draw(kept: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row from softmax(kept) (-inf entries never drawn) with uniforms u (B,)."""
    probs = torch.softmax(kept, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1).contiguous()
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return index.clamp_(max=kept.shape[-1] - 1)


def truncate(scaled: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """scaled logits with the tokens outside top-k, then top-p, then min-p set to -inf."""
    out = scaled
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p  # mass strictly before reaches top_p
        out = out.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if min_p > 0.0:
        logp = torch.log_softmax(out, dim=-1)
        out = out.masked_fill(logp < logp.max(dim=-1, keepdim=True).values + math.log(min_p),
                              float("-inf"))
    return out


class TokenSampler:
    """Samples one token per row from (B, V) logits; all on the logits' device, no host sync."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.temperature = params.temperature if params.temperature > 0 else 1.0

    def __call__(self, logits: torch.Tensor, streams: torch.Tensor, steps: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """tokens (B,) int64, their log-probs (B,) float32, and (top values, top ids) when logprobs_topk."""
        p = self.params
        scaled = logits.float() if self.temperature == 1.0 else logits.float() / self.temperature
        logp = torch.log_softmax(scaled, dim=-1)
        if p.greedy:
            tokens = logits.argmax(dim=-1)
        else:
            kept = truncate(logp, p.top_k, p.top_p, p.min_p)  # log-softmax is a shift of the scaled logits
            tokens = draw(kept, uniforms(streams, steps))
        chosen = logp.gather(1, tokens[:, None]).squeeze(1)
        top = None
        if p.logprobs_topk:
            top = torch.topk(logp, min(p.logprobs_topk, logp.shape[-1]), dim=-1)
            top = (top.values, top.indices)
        return tokens, chosen, top
