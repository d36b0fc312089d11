"""`linear_logprobs` in invariant mode: the LM head, log-softmax and entropy over fixed row tiles.

    z = (h @ W^T + b) / tau      (ROW_TILE, V) tiles, the whole vocabulary per tile
    logp = z[label] - logsumexp(z),   entropy = logsumexp(z) - sum_v p_v z_v
    dz = g_logp (onehot - p) - g_ent p (z - sum_v p_v z_v);   dh = (dz / tau) @ W   per tile

Each matmul call covers up to LM_ROW_TILE rows. On the CPU the rows are padded to a multiple of
ROW_TILE only: measured, a row of `F.linear` (and of `dz @ W`) has the same bits in calls of 32,
64, 96 or 128 rows (MKL, 1 and 2 threads; `tests/invariant/test_primitives.py` checks it on the
machine that runs the tests), so a decode step's few rows cost one 32-row call instead of a
128-row one. Elsewhere the rows are padded to whole LM_ROW_TILE calls: one call shape. The
reductions are row-wise, so a token's log-prob, entropy and d(loss)/d(hidden) row are bitwise
the same wherever the token sits (see `invariant.py`).
Memory: a few (LM_ROW_TILE, V) float32 tiles (78 MiB each at V = 152k). Math in float32 (float64 for float64
inputs). The Triton path is the fused kernel of `_logprobs_triton` with pinned tiles.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .invariant import LM_ROW_TILE, ROW_TILE, _padded_rows


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _padded(hidden: torch.Tensor) -> torch.Tensor:
    """Rows padded to ROW_TILE (CPU: calls of 32..128 rows agree per row) or to whole LM_ROW_TILE calls."""
    return _padded_rows(hidden, ROW_TILE if hidden.device.type == "cpu" else LM_ROW_TILE)


def _tile_logits(h_rows, weight, bias, temperature):
    return F.linear(h_rows, weight, bias) / temperature  # (rows, V): up to LM_ROW_TILE rows


class InvariantLinearLogprobs(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,)|None, labels (N,) -> logp (N,) [, entropy (N,)]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy):
        cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        n = hidden.shape[0]
        h = _padded(hidden.to(cdt))
        w, b = weight.to(cdt), _cast(bias, cdt)
        lab = torch.full((h.shape[0],), ignore_index, dtype=torch.int64, device=hidden.device)
        lab[:n] = labels
        valid = lab != ignore_index
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        logp, lse, pz = [], [], []
        for i in range(0, h.shape[0], LM_ROW_TILE):
            z = _tile_logits(h[i:i + LM_ROW_TILE], w, b, temperature)
            tile_lse = torch.logsumexp(z, -1)
            logp.append(z.gather(1, safe[i:i + LM_ROW_TILE, None]).squeeze(1) - tile_lse)
            lse.append(tile_lse)
            if return_entropy:
                pz.append((torch.exp(z - tile_lse[:, None]) * z).sum(-1))
        logp = torch.where(valid, torch.cat(logp), torch.zeros((), dtype=cdt, device=h.device))[:n]
        lse = torch.cat(lse)
        pz = torch.cat(pz) if return_entropy else None
        ctx.save_for_backward(hidden, weight, bias, labels, lse, pz)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        if not return_entropy:
            return logp
        entropy = torch.where(valid[:n], lse[:n] - pz[:n], torch.zeros((), dtype=cdt, device=h.device))
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, bias, labels, lse, pz = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = lse.dtype
        n, tau = hidden.shape[0], ctx.temperature
        h = _padded(hidden.to(cdt))
        w, b = weight.to(cdt), _cast(bias, cdt)
        rows = h.shape[0]
        lab = torch.full((rows,), ctx.ignore_index, dtype=torch.int64, device=h.device)
        lab[:n] = labels
        valid = lab != ctx.ignore_index
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        gl = h.new_zeros(rows)
        gl[:n] = g_logp.to(cdt) if g_logp is not None else 0
        gl = gl * valid
        ge = None
        if pz is not None and g_ent is not None:
            ge = h.new_zeros(rows)
            ge[:n] = g_ent.to(cdt)
            ge = ge * valid
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(w) if need_w else None
        db = torch.zeros_like(b) if need_b else None
        for i in range(0, rows, LM_ROW_TILE):
            sl = slice(i, i + LM_ROW_TILE)
            z = _tile_logits(h[sl], w, b, tau)
            p = torch.exp(z - lse[sl, None])
            dz = -gl[sl, None] * p
            dz.scatter_add_(1, safe[sl, None], gl[sl, None])
            if ge is not None:
                dz = dz - ge[sl, None] * p * (z - pz[sl, None])
            dz = dz / tau
            if need_h:
                dh[sl] = dz @ w
            if need_w:
                dw.addmm_(dz.t(), h[sl])
            if need_b:
                db += dz.sum(0)
        return (None if dh is None else dh[:n].to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None)


@torch.no_grad()
def invariant_sample_logprobs(hidden, weight, bias, temperature, choose):
    """One pass of the LM head for a sampler in invariant mode (the PyTorch path).

    `choose(logits)` gets the (N, V) float32 logits h W^T + b of the same tiles as
    `InvariantLinearLogprobs` and returns (tokens (N,) int64, extra); the tokens' log-probs are
    then taken from those logits with that class's very ops (z = logits / tau per LM_ROW_TILE call,
    z[token] - logsumexp(z)), so they equal the trainer's `linear_logprobs` bit for bit without a
    second LM-head matmul. Returns (tokens, logp (N,) float32, extra).
    """
    cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    n = hidden.shape[0]
    h = _padded(hidden.to(cdt))
    w, b = weight.to(cdt), _cast(bias, cdt)
    lin = [F.linear(h[i:i + LM_ROW_TILE], w, b) for i in range(0, h.shape[0], LM_ROW_TILE)]
    tokens, extra = choose(torch.cat(lin)[:n].float())
    safe = torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
    safe[:n] = tokens
    logp = []
    for g, i in zip(lin, range(0, h.shape[0], LM_ROW_TILE)):
        z = g / temperature  # `_tile_logits`' division, on the same matmul output
        logp.append(z.gather(1, safe[i:i + LM_ROW_TILE, None]).squeeze(1) - torch.logsumexp(z, -1))
    return tokens, torch.cat(logp)[:n].float(), extra


def invariant_linear_logprobs(hidden2d, weight, bias, labels1d, temperature, ignore_index, return_entropy,
                              use_triton: bool):
    """The invariant-mode body of `linear_logprobs` on 2-D hidden and 1-D labels (already validated)."""
    if use_triton:
        from ._logprobs_triton import LinearLogprobsTriton

        return LinearLogprobsTriton.apply(hidden2d, weight, bias, labels1d, temperature, ignore_index,
                                          return_entropy, False, True)
    return InvariantLinearLogprobs.apply(hidden2d, weight, bias, labels1d, temperature, ignore_index,
                                         return_entropy)
