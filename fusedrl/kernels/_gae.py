"""Generalised advantage estimation on packed or padded sequences.

Per sequence, with V_{end} = 0 (the episode ends with the sequence):

    d_t = r_t + gamma * V_{t+1} - V_t
    A_t = sum_l (gamma * lam)^l d_{t+l}      (the reverse scan A_t = d_t + gamma * lam * A_{t+1})
    G_t = A_t + V_t                          (returns, the value targets)

Shapes: rewards, values (total,) packed with cu_seqlens (B + 1,) int32, or
(B, T) padded (each row a sequence). Masked-out tokens come back as A = G = 0.
How the scan treats them is `masked=`:

    "zero" (default): a masked token is a step with r = V = 0 that the scan runs
        through. Right padding and prompt tokens before the completion are exact
        (nothing of the completion comes after them). A masked span *inside* a
        completion is not skipped: the token before it bootstraps from V = 0
        (d_t = r_t - V_t), the span's steps add d = gamma V_next, and every step
        of it discounts what follows by another gamma lam.
    "skip" (verl's gae with response_mask): the scan runs over the unmasked tokens
        only, as if the masked ones were cut out (multi-turn data with tool or
        user tokens inside the completion); this gathers those tokens first
        (a host sync for their count).

Triton: one program per sequence walks its tokens backwards (the scan is
serial in t; sequences run in parallel). No gradient: GAE makes targets.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _dispatch
from ._rl_layout import Layout, flat_mask, make_layout
from ._validate import FLOAT_DTYPES, check_tensor
from ._ranges import op_range

try:
    import triton
    import triton.language as tl
except Exception:  # Triton absent: the reference path runs
    triton = None

if triton is not None:

    @triton.jit
    def _gae_fwd_kernel(
        rewards_ptr,  # (N,) float, masked entries already zero
        values_ptr,  # (N,) float, masked entries already zero
        cu_seqlens_ptr,  # (B + 1,) int32
        adv_ptr,  # (N,) float32 out
        ret_ptr,  # (N,) float32 out
        gamma,
        gamma_lam,
    ):
        seq = tl.program_id(0).to(tl.int64)
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
        next_value = 0.0
        next_adv = 0.0
        t = end - 1
        # a while loop (not range) because the bounds are loaded values
        while t >= start:
            r = tl.load(rewards_ptr + t).to(tl.float32)
            v = tl.load(values_ptr + t).to(tl.float32)
            next_adv = r + gamma * next_value - v + gamma_lam * next_adv
            next_value = v
            tl.store(adv_ptr + t, next_adv)
            tl.store(ret_ptr + t, next_adv + v)
            t -= 1


def _gae_triton(rewards: torch.Tensor, values: torch.Tensor, layout: Layout, gamma: float, lam: float):
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if layout.num_seqs > 0 and rewards.numel() > 0:
        _gae_fwd_kernel[(layout.num_seqs,)](
            rewards, values, layout.cu_seqlens, adv, ret, float(gamma), float(gamma * lam)
        )
    return adv, ret


def gae_reference(rewards: torch.Tensor, values: torch.Tensor, layout: Layout, gamma: float, lam: float,
                  max_seqlen: Optional[int] = None):
    """The same scan vectorised over sequences, a Python loop over time (flat (N,) inputs)."""
    cu = layout.cu_seqlens.long()
    pos = torch.arange(rewards.numel(), device=rewards.device) - cu[layout.seq_ids]
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if layout.num_seqs else 0
    r = rewards.new_zeros(layout.num_seqs, max_seqlen + 1)  # one zero column past every end
    v = torch.zeros_like(r)
    r[layout.seq_ids, pos] = rewards
    v[layout.seq_ids, pos] = values
    adv = torch.zeros_like(r)
    for t in range(max_seqlen - 1, -1, -1):
        adv[:, t] = r[:, t] + gamma * v[:, t + 1] - v[:, t] + gamma * lam * adv[:, t + 1]
    adv_flat = adv[layout.seq_ids, pos]
    return adv_flat, adv_flat + values


def _scan(r, v, layout, gamma, lam, max_seqlen):
    if r.dtype == torch.float32 and _dispatch.use_triton(r, v):
        return _gae_triton(r, v, layout, gamma, lam)
    return gae_reference(r, v, layout, gamma, lam, max_seqlen)


@op_range("gae")
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    masked: str = "zero",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns, per token.

    Args:
        rewards: (B, T) padded or (total,) packed float per-token rewards (the
            sequence reward on the last completion token, see `fold_kl_into_rewards`).
        values: same shape, float value estimates V_t.
        mask: None (all tokens) or same shape; nonzero entries count (others read as r = V = 0).
        cu_seqlens: (B + 1,) int32 sequence boundaries when packed.
        max_seqlen: longest sequence (host int), optional; saves the reference path a sync.
        gamma: discount in [0, 1]; lam: GAE lambda in [0, 1].
        masked: "zero" (masked tokens are steps with r = V = 0 inside the scan) or "skip" (the
            scan runs over the unmasked tokens only); see the module docstring.
    Returns:
        (advantages, returns), each of rewards' shape, float32 (float64 for float64 inputs), detached.
    """
    check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES)
    layout = make_layout(rewards, cu_seqlens, name="rewards")
    check_tensor("values", values, dtypes=FLOAT_DTYPES)
    if values.shape != rewards.shape:
        raise ValueError(f"values must have rewards' shape {tuple(rewards.shape)}, got {tuple(values.shape)}")
    for name, value in (("gamma", gamma), ("lam", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if masked not in ("zero", "skip"):
        raise ValueError(f"masked must be 'zero' or 'skip', got {masked!r}")
    m = flat_mask(mask, layout)
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(m, rewards.detach().reshape(-1).to(dtype), zero)
    v = torch.where(m, values.detach().reshape(-1).to(dtype), zero)
    if masked == "skip":
        keep = torch.nonzero(m).flatten()
        counts = torch.zeros(layout.num_seqs, dtype=torch.long, device=r.device).index_add(
            0, layout.seq_ids, m.long())
        cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        sub = Layout((keep.numel(),), layout.num_seqs, cu, layout.seq_ids[keep])
        adv_k, ret_k = _scan(r[keep], v[keep], sub, gamma, lam, max_seqlen)
        adv = torch.zeros_like(r).index_copy(0, keep, adv_k)
        ret = torch.zeros_like(r).index_copy(0, keep, ret_k)
    else:
        adv, ret = _scan(r, v, layout, gamma, lam, max_seqlen)
    adv = torch.where(m, adv, zero)
    ret = torch.where(m, ret, zero)
    return adv.view(layout.shape), ret.view(layout.shape)
