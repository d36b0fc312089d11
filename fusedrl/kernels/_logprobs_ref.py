"""Exact, token-chunked PyTorch log-probs and entropy: the CPU path and the oracle's basis.

    z = (h @ W^T + b) / tau                         (N, V), never held whole
    logp = z[label] - logsumexp(z)                  (N,)
    entropy = logsumexp(z) - sum_v softmax(z)_v z_v (N,)
    dz = g_logp (onehot - p) - g_ent p (z - sum_v p_v z_v);  d(logits) = dz / tau

Both autograd Functions walk the tokens in chunks of about `CHUNK_ELEMS`
logits, save only `lse` and `sum_v p_v z_v` (N,) per token, and recompute each
chunk's logits in backward, so memory is bounded by one chunk plus the inputs
and their gradients. Math runs in float32 (float64 when an input is float64).

Also holds the host-side argument checks shared by the reference and Triton paths.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._autocast import autocast_off_backward
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_positive, check_same_device, check_shape, check_tensor

# Logits per chunk (rows * V): 2**22 fp32 values = 16 MiB per temporary.
CHUNK_ELEMS = 1 << 22


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


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMS // max(vocab, 1))


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


class LinearLogprobsRef(torch.autograd.Function):
    """Chunked exact reference for 2-D hidden (N, H), weight (V, H), bias (V,) or None, labels (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy):
        cd = compute_dtype(hidden, weight, bias)
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        n, vocab = hidden.shape[0], weight.shape[0]
        logp = torch.empty(n, dtype=cd, device=hidden.device)
        lse = torch.empty_like(logp)
        pz = torch.empty_like(logp) if return_entropy else None
        ent = torch.empty_like(logp) if return_entropy else None
        step = _chunk_rows(vocab)
        for s in range(0, n, step):
            z = _logits(hidden[s:s + step], w, b, temperature, cd)
            lp, ls, p_z, e = _stats(z, labels[s:s + step], ignore_index, return_entropy)
            logp[s:s + step], lse[s:s + step] = lp, ls
            if return_entropy:
                pz[s:s + step], ent[s:s + step] = p_z, e
        ctx.save_for_backward(hidden, weight, bias, labels, lse, pz)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return (logp, ent) if return_entropy else logp

    @staticmethod
    @autocast_off_backward
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, bias, labels, lse, pz = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cd = lse.dtype
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_b else None
        step = _chunk_rows(weight.shape[0])
        for s in range(0, hidden.shape[0], step):
            h = hidden[s:s + step].to(cd)
            z = _logits(h, w, b, ctx.temperature, cd)
            dz = _dz(z, lse[s:s + step], None if pz is None else pz[s:s + step], labels[s:s + step],
                     ctx.ignore_index, None if g_logp is None else g_logp[s:s + step],
                     None if g_ent is None else g_ent[s:s + step], ctx.temperature)
            if need_h:
                dh[s:s + step] = dz @ w
            if need_w:
                dw.addmm_(dz.T, h)
            if need_b:
                db += dz.sum(0)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None)


def _logits(h, w, b, temperature, cd):
    z = h.to(cd) @ w.T
    if b is not None:
        z += b
    return z / temperature


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
        step = _chunk_rows(logits.shape[1])
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
        step = _chunk_rows(logits.shape[1])
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
