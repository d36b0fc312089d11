"""The batched CPU varlen attention vs the per-document loop (reference.py), forward and backward.

Both are exact PyTorch paths; they must agree to float32 rounding on every mix of
document lengths (empty, one token, equal, long-tailed), GQA, windows and
non-causal attention, and the bucketing must cover every document exactly once.
"""
import pytest
import torch

from fusedrl.kernels import _attention_cpu
from fusedrl.kernels._attention_cpu import length_buckets, varlen_attention_batched
from fusedrl.kernels.reference import varlen_attention_reference
from tests.conftest import assert_close


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(fn, q, k, v, cu, grad_out, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, cu, max(1, int((cu[1:] - cu[:-1]).max())) if cu.numel() > 1 else 0, **kw)
    return (out,) + torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))


CASES = [  # lengths, Hq, Hkv, D, causal, window
    ([3, 0, 17, 1, 60, 33, 33, 2], 4, 2, 32, True, None),
    ([9, 30, 1, 0, 12, 5], 2, 2, 24, False, None),
    ([40, 7, 19, 70, 3], 3, 1, 16, True, (5, -1)),
    ([25, 1, 31, 8], 2, 1, 8, False, (3, 6)),
    ([50] * 6, 4, 4, 16, True, None),  # equal lengths: one bucket, no padding
    ([130], 2, 1, 16, False, (-1, 4)),  # one document: no gather
    ([200, 3, 90, 2, 2, 45, 150, 1], 2, 1, 16, True, (20, -1)),
]


@pytest.mark.parametrize("lengths,hq,hkv,d,causal,window", CASES)
def test_batched_matches_per_document_loop(lengths, hq, hkv, d, causal, window):
    gen = torch.Generator().manual_seed(sum(lengths))
    total = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, go = torch.randn(total, hq, d, generator=gen), torch.randn(total, hq, d, generator=gen)
    k, v = torch.randn(total, hkv, d, generator=gen), torch.randn(total, hkv, d, generator=gen)
    kw = dict(causal=causal, window=window, softmax_scale=0.7 / d ** 0.5)
    got = _run(varlen_attention_batched, q, k, v, cu, go, **kw)
    want = _run(varlen_attention_reference, q, k, v, cu, go, **kw)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert_close(a, e, atol=2e-5, rtol=1e-4, name=name)


def test_batched_bf16_and_float64():
    lengths = [21, 4, 0, 33]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(3)
    for dtype, tol in ((torch.float64, 1e-10), (torch.bfloat16, 3e-2)):
        q, k, v, go = (torch.randn(58, h, 16, generator=gen).to(dtype) for h in (4, 2, 2, 4))
        got = _run(varlen_attention_batched, q, k, v, cu, go)
        want = _run(varlen_attention_reference, q, k, v, cu, go)
        for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
            assert a.dtype == dtype
            assert_close(a.double(), e.double(), atol=tol, rtol=tol, name=f"{dtype} {name}")


def test_buckets_cover_every_document_once(monkeypatch):
    lengths = [0, 5, 300, 1, 17, 160, 16, 80, 0, 2, 40]
    buckets = length_buckets(lengths)
    flat = sorted(i for b in buckets for i in b)
    assert flat == [i for i, n in enumerate(lengths) if n > 0]
    for b in buckets:  # longest first inside a bucket; the others within RATIO of it (or short)
        head = lengths[b[0]]
        assert all(lengths[i] <= head for i in b)
        assert all(lengths[i] >= _attention_cpu.RATIO * head or head <= _attention_cpu.SHORT for i in b)
    monkeypatch.setattr(_attention_cpu, "MAX_BUCKET_SCORES", 16 * 16 * 2)
    assert all(len(b) <= 2 or lengths[b[0]] ** 2 * len(b) <= 16 * 16 * 2 for b in length_buckets([16] * 7))
    assert length_buckets([0, 0]) == []


def test_empty_batch():
    q = torch.randn(0, 2, 8)
    out = varlen_attention_batched(q, q[:, :1], q[:, :1], torch.zeros(3, dtype=torch.int32), 0)
    assert out.shape == (0, 2, 8)
