"""Tile shapes for the exact chunked PyTorch paths (CPU, and the GPU fallback where Triton can't run).

The (N, V) logits of `linear_logprobs` are walked in (rows x cols) tiles, one
temporary of that size at a time (two when the entropy is asked for). The shape
comes from the problem, not from a fixed element count:

- rows: as many tokens as make an efficient GEMM (`TARGET_ROWS`): a thin tile,
  e.g. 27 rows at V = 152k, runs the three matmuls at well under half the
  machine's matmul rate, and the weight-gradient matmul `dW[cols] += dz^T h`
  has only `rows` as its inner dimension;
- cols: the rest of the memory budget (`TILE_BYTES` per temporary), the whole
  vocabulary when it fits, else a multiple of `COL_ALIGN` (the forward then
  merges per-tile log-sum-exps online);
- the budget is also capped at 1/`MIN_TILES` of the whole logits (but not
  below `MIN_TILE_BYTES`), so that a mid-sized problem keeps its temporaries a
  small fraction of what the eager `log_softmax(h @ W.T)` would hold;
- when the whole vocabulary fits in fewer rows than the target, the rows grow
  to fill the budget (fewer Python-level steps).

`TILE_BYTES` and `TARGET_ROWS` are per device type; tests shrink them to force
many tiles in both directions.
"""
from __future__ import annotations

from typing import Tuple

import torch

# Bytes per temporary tile, by device type (CPU: a few tiles stay far below eager's peak).
TILE_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}
# Rows (tokens) per tile that keep the matmuls near the device's matmul rate.
TARGET_ROWS = {"cpu": 2048, "cuda": 4096}
COL_ALIGN = 256
MIN_TILES = 8
MIN_TILE_BYTES = 4 << 20  # below this the cap by MIN_TILES is not worth the extra steps
_OTHER = "cuda"  # any other accelerator takes the GPU numbers


def tile_shape(n: int, vocab: int, itemsize: int, device: torch.device | str = "cpu") -> Tuple[int, int]:
    """(rows, cols) of one logits tile for n tokens, a vocabulary of `vocab` and `itemsize`-byte math.

    rows in [1, max(n, 1)], cols in [1, vocab]; cols == vocab or cols % COL_ALIGN == 0.
    """
    if n < 0 or vocab < 1 or itemsize < 1:
        raise ValueError(f"tile_shape needs n >= 0, vocab >= 1, itemsize >= 1, got {n}, {vocab}, {itemsize}")
    kind = torch.device(device).type
    kind = kind if kind in TILE_BYTES else _OTHER
    n = max(n, 1)
    elems = max(1, min(TILE_BYTES[kind], max(MIN_TILE_BYTES, n * vocab * itemsize // MIN_TILES)) // itemsize)
    rows = min(n, TARGET_ROWS[kind])
    cols = elems // rows
    if cols >= vocab:  # the whole vocabulary fits: spend the rest of the budget on rows
        return min(n, max(rows, elems // vocab)), vocab
    if cols >= COL_ALIGN:
        return rows, cols // COL_ALIGN * COL_ALIGN
    # A budget too small for COL_ALIGN columns at the target rows: fewer rows, aligned columns.
    cols = min(vocab, COL_ALIGN)
    return max(1, min(rows, elems // cols)), cols


def row_chunk(n: int, vocab: int, itemsize: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk when every chunk must hold whole rows of `vocab` (given logits): budget-bound."""
    kind = torch.device(device).type
    kind = kind if kind in TILE_BYTES else _OTHER
    return max(1, min(max(n, 1), TILE_BYTES[kind] // itemsize // max(vocab, 1)))
