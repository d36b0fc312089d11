"""Distillation loss from both models' hidden states and LM heads, never building (N, V) logits.

Per token t (student S, teacher T; heads may have different hidden sizes, same vocabulary V):

    p_S = softmax((h_S W_S^T + b_S) / tau),  p_T = softmax((h_T W_T^T + b_T) / tau)
    forward_kl   D_t = KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)
    reverse_kl   D_t = KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)
    jsd (beta)   D_t = beta KL(p_T || m) + (1 - beta) KL(p_S || m),  m = beta p_T + (1 - beta) p_S,
                 beta = 0 -> forward KL, beta = 1 -> reverse KL (the endpoints are the KLs, as in
                 TRL's `generalized_jsd_loss` and Liger's `LigerFusedLinearJSD`: beta weighs the teacher)
    top_k = K    the same divergence over K + 1 buckets: the student's top-K tokens and one tail
                 bucket holding the rest of each distribution's mass (the SDPO recipe)

    l_t = w_t D_t on trained tokens (mask != 0 and labels != ignore_index), aggregated like
    `policy_loss`: token_mean, seq_mean or seq_mean_fixed_len over padded (B, T) or packed
    (total,) + cu_seqlens layouts.

The gradient flows to the student's hidden states, weight and bias only (the teacher is frozen;
weights and normalisers are constants). Because the loss is linear in D_t with known
coefficients, the backends compute the whole gradient during the forward pass, one token chunk
at a time (`_distill_ref.run_chunks`); backward only scales it by the upstream gradient. On CUDA
(or under force_backend("triton")) the chunk's logits are cuBLAS matmuls and the divergence and
d(logits) come from the Triton row kernel of `_distill_triton`; otherwise, and for any float64
input, the exact float32/float64 torch reference of `_distill_ref` runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from . import _dispatch
from ._distill_ref import KINDS, compute_dtype, chunk_rows, divergence_mode, ref_step, run_chunks
from ._rl_layout import Layout, Number, check_normaliser, flat_mask, make_layout, per_token_or_seq, segment_sum
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_positive, check_same_device, check_shape, check_tensor
from ._ranges import op_range

AGGREGATIONS = ("token_mean", "seq_mean", "seq_mean_fixed_len")


@dataclass(frozen=True)
class DistillConfig:
    """Validated options of `linear_distill_loss` (see its docstring)."""

    kind: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    top_k: Optional[int] = None
    aggregation: str = "token_mean"
    max_len: Optional[int] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise TypeError(f"beta must be a number, got {type(self.beta).__name__}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        check_positive("temperature", self.temperature)
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be None or a positive int, got {self.top_k!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.aggregation == "seq_mean_fixed_len":
            if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1:
                raise ValueError(f"aggregation 'seq_mean_fixed_len' needs max_len, a positive int; got {self.max_len!r}")

    @property
    def mode(self) -> int:
        return divergence_mode(self.kind, float(self.beta))


class LinearDistillFunction(torch.autograd.Function):
    """2-D student (N, H_S) / (V, H_S) / (V,)|None, teacher (N, H_T) / (V, H_T) / (V,)|None, coef (N,).

    Returns (loss = sum_t coef_t D_t, D (N,) detached). Gradients are formed in forward, kept on
    ctx, and handed over (scaled in place) by the one backward.
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, coef, cfg: DistillConfig, use_triton: bool, grad_enabled: bool):
        # needs_input_grad ignores torch.no_grad(): the caller's grad mode comes in as grad_enabled
        needs = tuple(bool(x) and grad_enabled for x in ctx.needs_input_grad[:3])
        grad = any(needs)
        mode, beta, tau = cfg.mode, float(cfg.beta), float(cfg.temperature)
        if use_triton:
            from ._distill_triton import make_triton_step

            step, rows, w_mm, h_mm = make_triton_step(hs, ws, bs, ht, wt, bt, coef, tau, mode, beta, cfg.top_k, grad)
            acc = w_mm.dtype
        else:
            cd = coef.dtype
            w_mm, h_mm, acc = ws.to(cd), hs, cd
            rows = chunk_rows(ws.shape[0])
            step = lambda s, e: ref_step(hs[s:e], ws, bs, ht[s:e], wt, bt,  # noqa: E731
                                         coef[s:e] if grad else None, tau, mode, beta, cfg.top_k, cd)
        div, dh, dw, db = run_chunks(step, h_mm, w_mm, coef, rows, needs, acc)
        div = torch.where(coef != 0, div.to(coef.dtype), 0.0)
        loss = (coef * div).sum()
        ctx.grads = (None if dh is None else dh.to(hs.dtype), None if dw is None else dw.to(ws.dtype),
                     None if db is None else db.to(bs.dtype))
        ctx.mark_non_differentiable(div)
        return loss, div

    @staticmethod
    def backward(ctx, g_loss, g_div=None):
        # The stored gradients are scaled in place and handed over (no gradient-sized copy, and
        # autograd can take them as .grad): so a graph through this op backpropagates once.
        if ctx.grads is None:
            raise RuntimeError("linear_distill_loss supports one backward per forward (its gradient is formed "
                               "in forward and handed over); recompute the loss to backpropagate again")
        grads, ctx.grads = ctx.grads, None
        scaled = tuple(None if t is None else t.mul_(g_loss.to(t.dtype)) for t in grads)
        return scaled + (None,) * 7


def _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
              labels, ignore_index):
    check_tensor("student_hidden", student_hidden, dtypes=FLOAT_DTYPES, min_ndim=2)
    check_tensor("teacher_hidden", teacher_hidden, dtypes=FLOAT_DTYPES, min_ndim=2)
    check_tensor("student_weight", student_weight, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("teacher_weight", teacher_weight, dtypes=FLOAT_DTYPES, ndim=2)
    vocab = student_weight.shape[0]
    if vocab < 2:
        raise ValueError(f"student_weight must have V >= 2 rows, got shape {tuple(student_weight.shape)}")
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_weight must have the student's vocabulary V = {vocab} rows, "
                         f"got shape {tuple(teacher_weight.shape)}")
    for name, hidden, weight in (("student", student_hidden, student_weight), ("teacher", teacher_hidden,
                                                                                teacher_weight)):
        if hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"{name}_hidden's last dim must equal {name}_weight.shape[1] = {weight.shape[1]}, "
                             f"got {name}_hidden shape {tuple(hidden.shape)}")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden must have student_hidden's token shape {tuple(student_hidden.shape[:-1])}, "
                         f"got {tuple(teacher_hidden.shape[:-1])}")
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None:
            check_tensor(name, bias, dtypes=FLOAT_DTYPES)
            check_shape(name, bias, (vocab,))
    if labels is not None:
        check_tensor("labels", labels, dtypes=INDEX_DTYPES)
        check_shape("labels", labels, student_hidden.shape[:-1])
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                      teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
                      labels=labels)


def token_coefficients(trained: torch.Tensor, weights: Optional[torch.Tensor], layout: Layout, cfg: DistillConfig,
                       num_tokens: Optional[Number], num_seqs: Optional[Number], dtype: torch.dtype) -> torch.Tensor:
    """c_t with loss = sum_t c_t D_t: the aggregation's weight of each token (0 off the trained ones)."""
    m = trained.to(dtype)
    w = m if weights is None else m * weights.detach().to(dtype)
    if cfg.aggregation == "token_mean":
        denom = m.sum().clamp(min=1) if num_tokens is None else num_tokens
        return w / denom
    seqs = max(layout.num_seqs, 1) if num_seqs is None else num_seqs
    if cfg.aggregation == "seq_mean":
        tokens = segment_sum(m, layout).clamp(min=1)
        return w / tokens[layout.seq_ids] / seqs
    return w / cfg.max_len / seqs


@op_range("linear_distill_loss")
def linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    ignore_index: int = -100,
    aggregation: str = "token_mean",
    max_len: Optional[int] = None,
    num_tokens: Optional[Number] = None,
    num_seqs: Optional[Number] = None,
    return_per_token: bool = False,
):
    """Per-token divergence between the student's and the teacher's next-token distributions.

    Args:
        student_hidden: (B, T, H_S) padded or (total, H_S) packed final hidden states (differentiable).
        student_weight: (V, H_S) student LM head (differentiable); student_bias: None or (V,).
        teacher_hidden: (B, T, H_T) or (total, H_T), the same tokens; teacher_weight: (V, H_T);
            teacher_bias: None or (V,). The teacher receives no gradient.
        labels: None or the token shape, int; positions equal to `ignore_index` are not trained
            (only their value is read; labels do not enter the divergence).
        mask: None or the token shape; nonzero = trained (combined with labels).
        weights: None, per token (token shape) or per sequence (B,) float: l_t = w_t D_t (constant).
        cu_seqlens: (B + 1,) int32 boundaries for the packed layout; packed input without it is
            one sequence of `total` tokens.
        kind: "forward_kl" | "reverse_kl" | "jsd"; beta: the JSD teacher weight in [0, 1]
            (0 = forward KL, 1 = reverse KL).
        temperature: > 0, divides both models' logits.
        top_k: None (exact, default) or K in [1, V): the top-K-plus-tail approximation.
        ignore_index: the label value of untrained positions.
        aggregation: "token_mean" | "seq_mean" | "seq_mean_fixed_len" (needs max_len), as in policy_loss;
            num_tokens / num_seqs: global normalisers under gradient accumulation.
        return_per_token: also return D_t (token shape, detached; 0 off the trained tokens), e.g.
            for the negative-reverse-KL dense reward of on-policy distillation.
    Returns:
        loss: 0-d float32 (float64 for float64 inputs); metrics: {"divergence": mean D over the
        trained tokens, "tokens": their count} (detached 0-d); and the per-token D when asked.
    """
    cfg = DistillConfig(kind=kind, beta=beta, temperature=temperature, top_k=top_k, aggregation=aggregation,
                        max_len=max_len)
    _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, labels,
              ignore_index)
    vocab = student_weight.shape[0]
    if top_k is not None and top_k >= vocab:
        raise ValueError(f"top_k must be < V = {vocab} (leave it None for the exact divergence), got {top_k}")
    check_normaliser("num_tokens", num_tokens)
    check_normaliser("num_seqs", num_seqs)
    if cu_seqlens is None and student_hidden.dim() == 2:  # (N, H) without boundaries: one sequence of N tokens
        cu_seqlens = torch.tensor([0, student_hidden.shape[0]], dtype=torch.int32, device=student_hidden.device)
    layout = make_layout(student_hidden[..., 0], cu_seqlens, name="student_hidden")
    trained = flat_mask(mask, layout)
    if labels is not None:
        trained = trained & (labels.reshape(-1) != ignore_index)
    flat_w = None if weights is None else per_token_or_seq("weights", weights, layout)
    cd = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
    coef = token_coefficients(trained, flat_w, layout, cfg, num_tokens, num_seqs, cd)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    wt = teacher_weight.detach()
    bt = None if teacher_bias is None else teacher_bias.detach()
    tensors = (hs, student_weight, ht, wt, student_bias, bt)
    use_triton = cd != torch.float64 and _dispatch.use_triton(*tensors)
    loss, div = LinearDistillFunction.apply(hs, student_weight, student_bias, ht, wt, bt, coef, cfg, use_triton,
                                            torch.is_grad_enabled())
    with torch.no_grad():
        count = trained.sum()
        metrics = {"divergence": (div.sum() / count.clamp(min=1)).float(), "tokens": count.float()}
    if return_per_token:
        return loss, metrics, div.reshape(layout.shape)
    return loss, metrics
