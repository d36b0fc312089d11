"""Exact, token-chunked PyTorch distillation divergence: the CPU path, and the driver both backends share.

Per token t (student S, teacher T, temperature tau, both heads over the same V):

    z_S = (h_S W_S^T + b_S) / tau,  a = log_softmax(z_S);   z_T = (h_T W_T^T + b_T) / tau,  b = log_softmax(z_T)
    forward KL   D = sum_v p_T (b - a)                      dD/dz_S = p_S - p_T
    reverse KL   D = sum_v p_S (a - b)                      dD/dz_S = p_S (a - b - D)
    JSD(beta)    log m = logaddexp(log(1 - beta) + a, log(beta) + b)
                 D = beta KL(p_T || m) + (1 - beta) KL(p_S || m)
                 dD/dz_S = (1 - beta) p_S (a - log m - KL(p_S || m))

(beta = 0 is the forward KL and beta = 1 the reverse KL: TRL's GKD / Liger's convention.)

The loss is linear in the per-token divergences, loss = sum_t c_t D_t with constant c_t
(aggregation weights), so the whole gradient is known once a chunk's logits are: the driver
`run_chunks` walks the tokens in chunks, asks a backend `step` for the chunk's D and
d(loss)/d(logits) (already scaled by c_t / tau), and turns it into dh (chunk rows), dW and db
(accumulated) at once. Nothing of size (N, V) ever exists: one chunk of logits per model.

Top-K approximation (`top_k = K`): the student's K most likely tokens I, both models'
log-probs there, and one tail bucket each, log(1 - sum_{i in I} p(i)) (computed as the
log-sum-exp of the logits outside I, minus the log-normaliser); the same divergence over
those K + 1 buckets. Its gradient comes from autograd on the chunk's logits.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd")
FORWARD, REVERSE, MIXTURE = 0, 1, 2  # the divergence actually computed (Triton constexpr MODE)

# Logits per chunk per model (rows * V): 2**22 values, 16 MiB in float32.
CHUNK_ELEMS = 1 << 22


def divergence_mode(kind: str, beta: float) -> int:
    """FORWARD / REVERSE / MIXTURE for (kind, beta); jsd with beta 0 or 1 is a KL (TRL convention)."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return FORWARD
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return REVERSE
    return MIXTURE


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def divergence_from_logprobs(a: torch.Tensor, b: torch.Tensor, mode: int, beta: float) -> torch.Tensor:
    """Per-row divergence (C,) of student log-probs a and teacher log-probs b, (C, K) each, any K.

    Differentiable (used with autograd by the top-K path); terms with zero probability count 0.
    """
    if mode == FORWARD:
        return torch.where(b > -math.inf, b.exp() * (b - a), 0.0).sum(-1)
    if mode == REVERSE:
        return torch.where(a > -math.inf, a.exp() * (a - b), 0.0).sum(-1)
    log_m = torch.logaddexp(a + math.log1p(-beta), b + math.log(beta))
    kl_t = torch.where(b > -math.inf, b.exp() * (b - log_m), 0.0).sum(-1)
    kl_s = torch.where(a > -math.inf, a.exp() * (a - log_m), 0.0).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def exact_rows(zs: torch.Tensor, zt: torch.Tensor, mode: int, beta: float,
               coef: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(D (C,), coef * dD/dz_S (C, V) or None) from scaled logits zs, zt (C, V); analytic gradient."""
    a = torch.log_softmax(zs, dim=-1)
    b = torch.log_softmax(zt, dim=-1)
    ps = a.exp()
    if mode == FORWARD:
        pt = b.exp()
        d = (pt * (b - a)).sum(-1)
        dz = None if coef is None else ps - pt
    elif mode == REVERSE:
        d = (ps * (a - b)).sum(-1)
        dz = None if coef is None else ps * (a - b - d[:, None])
    else:
        log_m = torch.logaddexp(a + math.log1p(-beta), b + math.log(beta))
        kl_s = (ps * (a - log_m)).sum(-1)
        kl_t = (b.exp() * (b - log_m)).sum(-1)
        d = beta * kl_t + (1.0 - beta) * kl_s
        dz = None if coef is None else (1.0 - beta) * ps * (a - log_m - kl_s[:, None])
    if dz is not None:
        dz = torch.where(coef[:, None] != 0, dz * coef[:, None], 0.0)
    return d, dz


def topk_rows(zs: torch.Tensor, zt: torch.Tensor, mode: int, beta: float, top_k: int,
              coef: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Top-K-plus-tail divergence (C,) and coef * dD/dz_S (C, V) (autograd through the K + 1 buckets)."""
    with torch.enable_grad():
        zs = zs.detach().requires_grad_(coef is not None)
        a = torch.log_softmax(zs, dim=-1)
        b = torch.log_softmax(zt.detach(), dim=-1)
        idx = a.detach().topk(top_k, dim=-1).indices  # (C, K): the student's top-K tokens
        outside = torch.ones_like(a, dtype=torch.bool).scatter(1, idx, False)
        tail_a = torch.logsumexp(torch.where(outside, a, -math.inf), dim=-1, keepdim=True)
        tail_b = torch.logsumexp(torch.where(outside, b, -math.inf), dim=-1, keepdim=True)
        buckets_a = torch.cat([a.gather(1, idx), tail_a], dim=1)
        buckets_b = torch.cat([b.gather(1, idx), tail_b], dim=1)
        d = divergence_from_logprobs(buckets_a, buckets_b, mode, beta)
        if coef is None:
            return d.detach(), None
        safe = torch.where(coef != 0, d, 0.0)  # masked rows may hold garbage; their gradient is 0
        (dz,) = torch.autograd.grad((safe * coef).sum(), zs)
    return d.detach(), dz


def ref_step(hs, ws, bs, ht, wt, bt, coef, temperature: float, mode: int, beta: float, top_k: Optional[int],
             cd: torch.dtype):
    """The reference backend's chunk step: (D (C,), d(loss)/d(raw student logits) (C, V) in cd, or None)."""
    zs = hs.to(cd) @ ws.to(cd).T
    zt = ht.to(cd) @ wt.to(cd).T
    if bs is not None:
        zs = zs + bs.to(cd)
    if bt is not None:
        zt = zt + bt.to(cd)
    zs, zt = zs / temperature, zt / temperature
    if top_k is None:
        d, dz = exact_rows(zs, zt, mode, beta, coef)
    else:
        d, dz = topk_rows(zs, zt, mode, beta, top_k, coef)
    return d, None if dz is None else dz / temperature


def chunk_rows(vocab: int, budget: Optional[int] = None, align: int = 1) -> int:
    """Rows per chunk so rows * V stays under `budget` elements (default CHUNK_ELEMS; at least `align` rows)."""
    rows = max(1, (CHUNK_ELEMS if budget is None else budget) // max(vocab, 1))
    return max(align, rows // align * align)


def run_chunks(step: Callable, student_hidden: torch.Tensor, student_weight_mm: torch.Tensor, coef: torch.Tensor,
               rows: int, needs: Tuple[bool, bool, bool], acc_dtype: torch.dtype):
    """Drive `step(s, e) -> (D (e-s,), dlogits (e-s, V) | None)` over token chunks [s, e).

    dlogits multiplies `student_weight_mm` (V, H) (dh rows) and the student hidden chunk (dW);
    dW and db accumulate in `acc_dtype` across chunks. Returns (D (N,) float, dh, dW, db),
    the gradients None where not needed.
    """
    need_h, need_w, need_b = needs
    n, vocab = student_hidden.shape[0], student_weight_mm.shape[0]
    dev = student_hidden.device
    div = torch.zeros(n, dtype=coef.dtype, device=dev)
    dh = torch.zeros(student_hidden.shape, dtype=student_hidden.dtype, device=dev) if need_h else None
    dw = torch.zeros(student_weight_mm.shape, dtype=acc_dtype, device=dev) if need_w else None
    db = torch.zeros(vocab, dtype=coef.dtype, device=dev) if need_b else None
    for s in range(0, n, rows):
        e = min(n, s + rows)
        d, dlogits = step(s, e)
        div[s:e] = d
        if dlogits is None:
            continue
        if need_h:
            dh[s:e] = (dlogits @ student_weight_mm).to(dh.dtype)
        if need_w:  # untrained rows may hold padding garbage (NaN): 0 * NaN must not reach dW
            h = torch.where(coef[s:e, None] != 0, student_hidden[s:e].to(dlogits.dtype), 0.0)
            dw.addmm_(dlogits.T, h)
        if need_b:
            db += dlogits.sum(0, dtype=db.dtype)
    return div, dh, dw, db
