"""Per-token statistics of the LM-head logits that trainers log, without the (N, V) logits.

    z = (h @ W^T + b) / tau
    mean_logits[n] = (1/V) sum_v z[n, v]
    is_top1[n]     = argmax_v z[n, v] == label[n]   (ties: the first maximum wins, as torch.argmax)

Both are 0 / False where the label is `ignore_index` and carry no gradient. TRL's DPO
trainer logs them (`logits/chosen`, `mean_token_accuracy`). The Triton path computes
them inside the log-prob forward (three extra per-tile partials); this reference runs
a separate no-grad pass over token chunks of ~4M logits (one more forward matmul,
CPU/float64 path only).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._logprobs_ref import compute_dtype

CHUNK_ELEMS = 1 << 22  # logits per chunk: 16 MiB of float32


@torch.no_grad()
def logit_stats_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          labels: torch.Tensor, temperature: float,
                          ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean_logits (N,) float32/float64, is_top1 (N,) bool) for 2-D hidden (N, H), labels (N,)."""
    cd = compute_dtype(hidden, weight, bias)
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    n, vocab = hidden.shape[0], weight.shape[0]
    mean = torch.zeros(n, dtype=cd, device=hidden.device)
    top1 = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    step = max(1, CHUNK_ELEMS // max(vocab, 1))
    for s in range(0, n, step):
        z = hidden[s:s + step].to(cd) @ w.T
        if b is not None:
            z += b
        z /= temperature
        valid = labels[s:s + step] != ignore_index
        mean[s:s + step] = torch.where(valid, z.mean(-1), torch.zeros((), dtype=cd, device=z.device))
        top1[s:s + step] = valid & (z.argmax(-1) == labels[s:s + step])
    return mean, top1
