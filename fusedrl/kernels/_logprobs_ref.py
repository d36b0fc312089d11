"""Exact, token-chunked PyTorch log-probs and entropy: the CPU path and the oracle's basis.

    z = (h @ W^T + b) / tau                         (N, V), never held whole
    logp = z[label] - logsumexp(z)                  (N,)
    entropy = logsumexp(z) - sum_v softmax(z)_v z_v (N,)
    dz = g_logp (onehot - p) - g_ent p (z - sum_v p_v z_v);  d(logits) = dz / tau

`LinearLogprobsRef` walks the logits in (rows x cols) tiles shaped by
`_tiles.tile_shape` (rows enough for an efficient GEMM, columns bounded by a
memory budget; a vocabulary split over several tiles is merged with an online
log-sum-exp), saves only `lse` and `sum_v p_v z_v` (N,) per token, and
recomputes each tile's logits in backward (one GEMM straight into a reused
buffer), then accumulates dh and dW with in-place `addmm_`. Memory is bounded
by one or two tiles plus the inputs and their gradients. `LogitsLogprobsRef`
walks given logits in chunks of whole rows under the same budget. Math runs
in float32 (float64 when an input is float64).

Also holds the host-side argument checks shared by the reference and Triton paths.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _tiles
from ._autocast import autocast_off_backward
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_positive, check_same_device, check_shape, check_tensor

def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_labels(labels: torch.Tensor, lead: Tuple[int, ...], vocab: int, ignore_index: int) -> None:
    check_tensor("labels", labels, dtypes=INDEX_DTYPES)
    check_shape("labels", labels, lead)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # A range check on a GPU tensor would need a host sync, so it runs only on CPU;
    # out-of-range labels on GPU are the caller's error (they give garbage, never a fault).
    if labels.device.type == "cpu" and labels.numel() > 0:
        valid = labels != ignore_index
        bad = valid & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = int(labels[bad][0])
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got {first}")


def validate_linear(hidden, weight, labels, bias, temperature, ignore_index) -> None:
    """Raise TypeError/ValueError naming the argument for any bad input of `linear_logprobs`."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (V >= 1), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (weight.shape[0],))
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight.shape[1] = {weight.shape[1]} (H), got hidden shape {tuple(hidden.shape)}"
        )
    check_same_device(hidden=hidden, weight=weight, labels=labels if isinstance(labels, torch.Tensor) else None,
                      bias=bias)
    check_positive("temperature", temperature)
    _check_labels(labels, tuple(hidden.shape[:-1]), weight.shape[0], ignore_index)


def validate_logits(logits, labels, temperature, ignore_index) -> None:
    """Raise TypeError/ValueError naming the argument for any bad input of `logprobs_from_logits`."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, min_ndim=1)
    if logits.shape[-1] < 1:
        raise ValueError(f"logits' last dim (V) must be >= 1, got shape {tuple(logits.shape)}")
    check_same_device(logits=logits, labels=labels if isinstance(labels, torch.Tensor) else None)
    check_positive("temperature", temperature)
    _check_labels(labels, tuple(logits.shape[:-1]), logits.shape[-1], ignore_index)


def _chunk_rows(vocab: int, n: int, itemsize: int, device) -> int:
    """Rows per chunk of given logits (whole rows): the tile budget of `_tiles`."""
    return _tiles.row_chunk(n, vocab, itemsize, device)


def _stats(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, entropy: bool):
    """(logp, lse, pz, entropy-or-None) of one chunk of scaled logits z (C, V)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(z, dim=-1)
    logp = torch.where(valid, z.gather(1, safe[:, None])[:, 0] - lse, torch.zeros_like(lse))
    if not entropy:
        return logp, lse, None, None
    pz = (torch.exp(z - lse[:, None]) * z).sum(-1)
    ent = torch.where(valid, lse - pz, torch.zeros_like(lse))
    return logp, lse, pz, ent


def _dz(z, lse, pz, labels, ignore_index, g_logp, g_ent, temperature):
    """d(loss)/d(logits) of one chunk, (C, V), in z's dtype."""
    valid = labels != ignore_index
    p = torch.exp(z - lse[:, None])
    dz = torch.zeros_like(z)
    if g_logp is not None:
        gl = torch.where(valid, g_logp.to(z.dtype), torch.zeros_like(lse))
        dz -= gl[:, None] * p
        safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
        dz.scatter_add_(1, safe[:, None], gl[:, None])
    if g_ent is not None:
        ge = torch.where(valid, g_ent.to(z.dtype), torch.zeros_like(lse))
        dz -= ge[:, None] * p * (z - pz[:, None])
    return dz / temperature


def _label_hits(labels: torch.Tensor, c0: int, c1: int):
    """(hit (C,) bool, column (C, 1) long): which rows' labels fall in columns [c0, c1), and where.

    Rows that miss get a clamped in-range column, to be masked by `hit`; no host sync (no nonzero),
    so the GPU fallback never waits. Ignored labels are out of every range here.
    """
    hit = (labels >= c0) & (labels < c1)
    return hit, (labels.long() - c0).clamp_(0, c1 - c0 - 1)[:, None]


def _scaled_logits(out, h, w, b, inv_tau, shift=None):
    """out = (h @ w^T + b) * inv_tau - shift[:, None], into the preallocated tile `out` (one GEMM)."""
    if b is not None:
        torch.addmm(b, h, w.T, beta=inv_tau, alpha=inv_tau, out=out)
        if shift is not None:
            out.sub_(shift[:, None])
    elif shift is not None:
        torch.addmm(shift[:, None], h, w.T, beta=-1.0, alpha=inv_tau, out=out)
    else:
        torch.mm(h, w.T, out=out)
        if inv_tau != 1.0:
            out.mul_(inv_tau)
    return out


def _forward_rows(h, w, b, labels, inv_tau, entropy, cols, bufs):
    """(lse, pz or None, z[label]) of one row block, sweeping the vocabulary in tiles of `cols`.

    Per tile: max m_c, s_c = sum exp(z - m_c) (and t_c = sum exp(z - m_c) z), merged
    online into (m, s, t): lse = m + log s, pz = t / s.
    """
    rows, vocab = h.shape[0], w.shape[0]
    zl = torch.zeros(rows, dtype=h.dtype, device=h.device)
    m = s = t = None
    for c0 in range(0, vocab, cols):
        c1 = min(vocab, c0 + cols)
        z = _scaled_logits(bufs[0][:rows * (c1 - c0)].view(rows, c1 - c0), h, w[c0:c1],
                           None if b is None else b[c0:c1], inv_tau)
        hit, col = _label_hits(labels, c0, c1)
        zl = torch.where(hit, z.gather(1, col)[:, 0], zl)
        m_c = z.amax(dim=1)
        if entropy:
            e = torch.sub(z, m_c[:, None], out=bufs[1][:z.numel()].view_as(z)).exp_()
            t_c = torch.linalg.vecdot(e, z)
        else:
            e = z.sub_(m_c[:, None]).exp_()
            t_c = None
        s_c = e.sum(dim=1)
        if m is None:
            m, s, t = m_c, s_c, t_c
            continue
        m_new = torch.maximum(m, m_c)
        a, a_c = torch.exp(m - m_new), torch.exp(m_c - m_new)
        s = s * a + s_c * a_c
        t = t * a + t_c * a_c if entropy else None
        m = m_new
    lse = m + torch.log(s)
    return lse, (t / s if entropy else None), zl


def _backward_rows(h, w, b, labels, inv_tau, lse, pz, gl, ge, cols, bufs, dh, dw, db):
    """Accumulate one row block's dh, dW, db; tiles recompute u = z - lse and p = exp(u).

    q = -d(loss)/dz = p (gl + ge (z - pz)) - gl onehot;  z - pz = u + (lse - pz).
    """
    rows, vocab = h.shape[0], w.shape[0]
    ent_shift = None if ge is None else lse - pz
    for c0 in range(0, vocab, cols):
        c1 = min(vocab, c0 + cols)
        u = _scaled_logits(bufs[0][:rows * (c1 - c0)].view(rows, c1 - c0), h, w[c0:c1],
                           None if b is None else b[c0:c1], inv_tau, shift=lse)
        if ge is None:
            q = u.exp_().mul_(gl[:, None])
        else:
            q = torch.exp(u, out=bufs[1][:u.numel()].view_as(u))
            coef = u.add_(ent_shift[:, None]).mul_(ge[:, None])
            if gl is not None:
                coef.add_(gl[:, None])
            q.mul_(coef)
        if gl is not None:
            hit, col = _label_hits(labels, c0, c1)
            q.scatter_add_(1, col, torch.where(hit, -gl, torch.zeros((), dtype=gl.dtype, device=gl.device))[:, None])
        if dh is not None:
            dh.addmm_(q, w[c0:c1], alpha=-inv_tau)
        if dw is not None:
            dw[c0:c1].addmm_(q.T, h, alpha=-inv_tau)
        if db is not None:
            db[c0:c1].sub_(q.sum(dim=0), alpha=inv_tau)


def _tiles_for(n, vocab, cd, device):
    rows, cols = _tiles.tile_shape(n, vocab, torch.empty(0, dtype=cd).element_size(), device)
    return rows, cols


def _buffers(count, rows, cols, cd, device):
    return [torch.empty(rows * cols, dtype=cd, device=device) for _ in range(count)]


def _valid_grad(g, valid, cd):
    return None if g is None else torch.where(valid, g.to(cd), torch.zeros((), dtype=cd, device=g.device))


class LinearLogprobsRef(torch.autograd.Function):
    """Tiled exact reference for 2-D hidden (N, H), weight (V, H), bias (V,) or None, labels (N,).

    Tiles of `_tiles.tile_shape` (rows x cols) logits: forward keeps (lse, sum_v p_v z_v)
    per token; backward recomputes each tile (one GEMM) and accumulates dh, dW, db.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy):
        cd = compute_dtype(hidden, weight, bias)
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        n, vocab = hidden.shape[0], weight.shape[0]
        inv_tau = 1.0 / temperature
        valid = labels != ignore_index
        lse = torch.empty(n, dtype=cd, device=hidden.device)
        zl = torch.empty_like(lse)
        pz = torch.empty_like(lse) if return_entropy else None
        rows, cols = _tiles_for(n, vocab, cd, hidden.device)
        bufs = _buffers(1 + bool(return_entropy), min(rows, max(n, 1)), cols, cd, hidden.device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            out = _forward_rows(hidden[r0:r1].to(cd), w, b, labels[r0:r1], inv_tau, return_entropy, cols, bufs)
            lse[r0:r1], zl[r0:r1] = out[0], out[2]
            if return_entropy:
                pz[r0:r1] = out[1]
        del bufs
        logp = torch.where(valid, zl - lse, torch.zeros((), dtype=cd, device=lse.device))
        ctx.save_for_backward(hidden, weight, bias, labels, lse, pz)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        if not return_entropy:
            return logp
        return logp, torch.where(valid, lse - pz, torch.zeros((), dtype=cd, device=lse.device))

    @staticmethod
    @autocast_off_backward
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, bias, labels, lse, pz = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cd = lse.dtype
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        valid = labels != ctx.ignore_index
        gl, ge = _valid_grad(g_logp, valid, cd), _valid_grad(g_ent, valid, cd)
        n, vocab = hidden.shape[0], weight.shape[0]
        dh = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
        db = torch.zeros(vocab, dtype=cd, device=weight.device) if need_b else None
        if (gl is not None or ge is not None) and (need_h or need_w or need_b):
            rows, cols = _tiles_for(n, vocab, cd, hidden.device)
            bufs = _buffers(1 + (ge is not None), min(rows, max(n, 1)), cols, cd, hidden.device)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                _backward_rows(hidden[r0:r1].to(cd), w, b, labels[r0:r1], 1.0 / ctx.temperature, lse[r0:r1],
                               None if pz is None else pz[r0:r1], None if gl is None else gl[r0:r1],
                               None if ge is None else ge[r0:r1], cols, bufs,
                               None if dh is None else dh[r0:r1], dw, db)
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None)


class LogitsLogprobsRef(torch.autograd.Function):
    """Chunked exact reference for 2-D logits (N, V) and labels (N,); d(logits) in logits' dtype."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy):
        cd = compute_dtype(logits)
        n = logits.shape[0]
        logp = torch.empty(n, dtype=cd, device=logits.device)
        lse = torch.empty_like(logp)
        pz = torch.empty_like(logp) if return_entropy else None
        ent = torch.empty_like(logp) if return_entropy else None
        step = _chunk_rows(logits.shape[1], n, torch.empty(0, dtype=cd).element_size(), logits.device)
        for s in range(0, n, step):
            z = logits[s:s + step].to(cd) / temperature
            lp, ls, p_z, e = _stats(z, labels[s:s + step], ignore_index, return_entropy)
            logp[s:s + step], lse[s:s + step] = lp, ls
            if return_entropy:
                pz[s:s + step], ent[s:s + step] = p_z, e
        ctx.save_for_backward(logits, labels, lse, pz)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return (logp, ent) if return_entropy else logp

    @staticmethod
    @autocast_off_backward
    def backward(ctx, g_logp, g_ent=None):
        logits, labels, lse, pz = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        d_logits = torch.empty_like(logits)
        itemsize = torch.empty(0, dtype=lse.dtype).element_size()
        step = _chunk_rows(logits.shape[1], logits.shape[0], itemsize, logits.device)
        for s in range(0, logits.shape[0], step):
            z = logits[s:s + step].to(lse.dtype) / ctx.temperature
            d_logits[s:s + step] = _dz(z, lse[s:s + step], None if pz is None else pz[s:s + step],
                                       labels[s:s + step], ctx.ignore_index,
                                       None if g_logp is None else g_logp[s:s + step],
                                       None if g_ent is None else g_ent[s:s + step], ctx.temperature)
        return d_logits, None, None, None, None


def unflatten_outputs(out, lead, return_entropy):
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)


def linear_logprobs_chunked(hidden, weight, labels, bias, temperature, ignore_index, return_entropy):
    """Validated, shape-handling entry of the linear reference (any leading shape)."""
    validate_linear(hidden, weight, labels, bias, temperature, ignore_index)
    lead = tuple(hidden.shape[:-1])
    out = LinearLogprobsRef.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1),
                                  float(temperature), ignore_index, bool(return_entropy))
    return unflatten_outputs(out, lead, return_entropy)


def logprobs_from_logits_chunked(logits, labels, temperature, ignore_index, return_entropy):
    """Validated, shape-handling entry of the logits reference (any leading shape)."""
    validate_logits(logits, labels, temperature, ignore_index)
    lead = tuple(logits.shape[:-1])
    out = LogitsLogprobsRef.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                  float(temperature), ignore_index, bool(return_entropy))
    return unflatten_outputs(out, lead, return_entropy)
