"""Token layouts shared by the RL objectives: padded (B, T) or packed (total,) + cu_seqlens.

Every objective turns its inputs into one normal form: flat tokens (N,), the
sequence id of each token (N,) int64 and a host int B, so padded and packed
inputs run the very same code (a padded batch is a packed one with B rows of
length T: cu_seqlens = [0, T, 2T, ...]).

Validation of cu_seqlens *values* (0 first, non-decreasing, last == total)
only runs when cu_seqlens lives on the CPU: on a GPU it would cost a host
sync, which the ops avoid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ._validate import FLOAT_DTYPES, check_tensor

Number = Union[int, float, torch.Tensor]


@dataclass
class Layout:
    """Flat view of a padded or packed batch.

    shape:      the original per-token shape ((B, T) or (total,)).
    num_seqs:   B, a host int.
    cu_seqlens: (B + 1,) int32 boundaries in the flat token order.
    seq_ids:    (N,) int64 sequence index of every flat token.
    """

    shape: tuple
    num_seqs: int
    cu_seqlens: torch.Tensor
    seq_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(torch.Size(self.shape).numel())


def check_cu_seqlens(cu_seqlens, total: int, name: str = "cu_seqlens") -> torch.Tensor:
    """Raise unless cu_seqlens is an int32 (B+1,) tensor bounding `total` tokens."""
    check_tensor(name, cu_seqlens, dtypes=(torch.int32,), ndim=1)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have B + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type == "cpu":  # value checks cost nothing on the host
        if int(cu_seqlens[0]) != 0:
            raise ValueError(f"{name}[0] must be 0, got {int(cu_seqlens[0])}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing, got {cu_seqlens.tolist()}")
        if int(cu_seqlens[-1]) != total:
            raise ValueError(f"{name}[-1] must equal the number of tokens {total}, got {int(cu_seqlens[-1])}")
    return cu_seqlens


def make_layout(tokens: torch.Tensor, cu_seqlens: Optional[torch.Tensor], name: str = "logp") -> Layout:
    """Layout of a per-token tensor: (B, T) padded, or (total,) packed with cu_seqlens."""
    device = tokens.device
    if cu_seqlens is None:
        if tokens.dim() != 2:
            raise ValueError(
                f"{name} must be (B, T) padded, or (total,) packed with cu_seqlens; got shape {tuple(tokens.shape)} "
                "and no cu_seqlens"
            )
        b, t = tokens.shape
        cu = torch.arange(b + 1, device=device, dtype=torch.int32) * t
        seq_ids = torch.arange(b, device=device).repeat_interleave(t)
        return Layout(tuple(tokens.shape), b, cu, seq_ids)
    if tokens.dim() != 1:
        raise ValueError(f"{name} must be 1-D (total,) when cu_seqlens is given, got shape {tuple(tokens.shape)}")
    check_cu_seqlens(cu_seqlens, tokens.numel())
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on {name}'s device {device}, got {cu_seqlens.device}")
    if device.type == "cpu":  # cu_seqlens was validated above: each sequence id repeated over its tokens
        seq_ids = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=device),
                                          cu_seqlens.diff().long(), output_size=tokens.numel())
    else:  # the sequence of token p is the number of boundaries cu[1:] that are <= p (no host sync)
        positions = torch.arange(tokens.numel(), device=device, dtype=torch.int32)
        seq_ids = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True).long()
    return Layout(tuple(tokens.shape), cu_seqlens.numel() - 1, cu_seqlens, seq_ids)


def check_token_tensor(name: str, value, layout: Layout, *, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """A per-token tensor of the layout's shape."""
    check_tensor(name, value, dtypes=dtypes)
    if tuple(value.shape) != layout.shape:
        raise ValueError(f"{name} must have the per-token shape {layout.shape}, got {tuple(value.shape)}")
    return value


LAYOUTS = ("token", "sequence")


def per_token_or_seq(name: str, value, layout: Layout, which: Optional[str] = None,
                     arg: str = "advantages_layout") -> torch.Tensor:
    """Flat (N,) float view of a per-token tensor (layout shape) or a per-sequence one (B,).

    which: "token", "sequence", or None to read the layout from the shape. The shape
    alone decides only when exactly one reading fits: a packed batch with as many
    tokens as sequences (say one empty sequence and one of two tokens) is ambiguous,
    and None then raises ValueError naming `arg` instead of guessing.
    """
    check_tensor(name, value, dtypes=FLOAT_DTYPES)
    if which is not None and which not in LAYOUTS:
        raise ValueError(f"{arg} must be None, 'token' or 'sequence', got {which!r}")
    shape = tuple(value.shape)
    fits_token, fits_seq = shape == layout.shape, shape == (layout.num_seqs,)
    if which is None:
        if fits_token and fits_seq:
            raise ValueError(
                f"{name} of shape {shape} is ambiguous: this batch has as many tokens as sequences "
                f"({layout.num_seqs}), so it can be read per token or per sequence; pass {arg}='token' or "
                f"{arg}='sequence'")
        which = "token" if fits_token else "sequence" if fits_seq else None
    if which == "token" and fits_token:
        return value.reshape(-1)
    if which == "sequence" and fits_seq:
        return value.index_select(0, layout.seq_ids)
    want = {"token": f"per token {layout.shape}", "sequence": f"per sequence ({layout.num_seqs},)",
            None: f"per token {layout.shape} or per sequence ({layout.num_seqs},)"}[which]
    raise ValueError(f"{name} must be {want}, got {shape}")


def flat_mask(mask, layout: Layout) -> torch.Tensor:
    """(N,) bool mask (all True when mask is None); nonzero entries count."""
    if mask is None:
        return torch.ones(layout.num_tokens, dtype=torch.bool, device=layout.seq_ids.device)
    check_tensor("mask", mask)
    if tuple(mask.shape) != layout.shape:
        raise ValueError(f"mask must have the per-token shape {layout.shape}, got {tuple(mask.shape)}")
    return mask.reshape(-1) if mask.dtype == torch.bool else mask.reshape(-1) != 0


def segment_sum(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(N,) -> (B,) sum of each sequence's tokens (differentiable)."""
    out = values.new_zeros(layout.num_seqs)
    return out.index_add(0, layout.seq_ids, values)


def check_normaliser(name: str, value: Optional[Number]) -> None:
    """A global normaliser: None, a positive host number, or a tensor (not checked: no sync)."""
    if value is None or isinstance(value, torch.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a 0-d tensor, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def batch_mean(values: torch.Tensor, normaliser: Optional[Number]) -> torch.Tensor:
    """sum(values) / normaliser, defaulting the normaliser to values' length."""
    denom = max(values.numel(), 1) if normaliser is None else normaliser
    return values.sum() / denom
