"""This machine's ceilings, measured: a large GEMM (TFLOP/s) and a large copy (GB/s, read + write).

CUDA: an 8192^3 GEMM in the op's dtype and a 1 GiB device-to-device copy. CPU: a 2048^3 GEMM
and a 256 MiB copy with the threads torch uses now. `smoke=True` shrinks both (256^3, 16 MiB) so
the tests run in a second; those numbers are not ceilings. Each value is cached per process.
"""
from __future__ import annotations

import functools

import torch

from fusedrl.bench.common import time_ms


def _gemm_size(device: str, smoke: bool) -> int:
    if smoke:
        return 256
    return 8192 if device == "cuda" else 2048


@functools.lru_cache(maxsize=None)
def matmul_ceiling_tflops(device: str, dtype: torch.dtype = torch.float32, smoke: bool = False) -> float:
    """Median TFLOP/s of `a @ b` (square, `dtype`; float64 and CPU half types measured as they are)."""
    size = _gemm_size(device, smoke)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    p50, _, _ = time_ms(lambda: torch.mm(a, b))
    return 2.0 * size ** 3 / (p50 * 1e-3) / 1e12


@functools.lru_cache(maxsize=None)
def copy_ceiling_gbps(device: str, smoke: bool = False) -> float:
    """Median GB/s of `dst.copy_(src)`, counting the bytes read plus the bytes written."""
    nbytes = (16 << 20) if smoke else ((1 << 30) if device == "cuda" else (256 << 20))
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    p50, _, _ = time_ms(lambda: dst.copy_(src))
    return 2.0 * nbytes / (p50 * 1e-3) / 1e9
