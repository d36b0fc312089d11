"""Invariant primitives: the flag, and fixed-tile linear / RMSNorm / attention exact vs a float64 oracle
and bitwise the same whatever else shares the call."""
import threading

import pytest
import torch
import torch.nn.functional as F

from fusedrl.kernels.invariant import ROW_TILE, invariant, invariant_linear, invariant_rms_norm, is_invariant, set_invariant
from fusedrl.kernels.invariant_attention import (KV_BLOCK, attend_sequence, invariant_varlen_attention,
                                                 paged_sequence_keys)
from tests.conftest import assert_close


def test_flag_context_decorator_nesting_threads_and_default():
    assert not is_invariant()
    with invariant():
        assert is_invariant()
        with invariant(False):
            assert not is_invariant()
        assert is_invariant()
        seen = []
        worker = threading.Thread(target=lambda: seen.append(is_invariant()))
        worker.start(), worker.join()
        assert seen == [False], "the context flag is per thread"
    assert not is_invariant()

    @invariant()
    def inside():
        return is_invariant()

    assert inside() and inside() and not is_invariant()
    set_invariant(True)
    try:
        assert is_invariant()
        with invariant(False):
            assert not is_invariant()
    finally:
        set_invariant(False)
    with pytest.raises(TypeError, match="enabled"):
        with invariant("yes"):
            pass
    with pytest.raises(TypeError, match="enabled"):
        set_invariant(1)


def test_invariant_linear_exact_and_rows_independent_of_the_call():
    torch.manual_seed(0)
    x, w, b = torch.randn(77, 41, dtype=torch.float64), torch.randn(29, 41, dtype=torch.float64), torch.randn(29)
    x.requires_grad_(True)
    y = invariant_linear(x, w, b.double())
    ref = x.detach() @ w.T + b.double()
    assert_close(y, ref, name="invariant_linear")
    g = torch.randn_like(y)
    y.backward(g)
    assert_close(x.grad, g @ w, name="d x")
    xf, wf = x.detach().float(), w.float()
    full = invariant_linear(xf, wf)
    for start, size in [(0, 1), (5, 3), (31, 2), (40, 37), (1, 64)]:
        assert torch.equal(invariant_linear(xf[start:start + size], wf), full[start:start + size]), (start, size)
    assert torch.equal(invariant_linear(xf.view(7, 11, 41), wf).view(77, 29), full)
    with pytest.raises(ValueError, match="x must be"):
        invariant_linear(torch.randn(3, 40), wf)
    with pytest.raises(ValueError, match="weight"):
        invariant_linear(xf, wf[0])


@pytest.mark.parametrize("with_bias", [False, True])
def test_invariant_linear_and_rms_norm_equal_one_call_per_tile_for_any_tile_count(with_bias):
    """The batched CPU path gives each tile the bits of its own `F.linear` (and RMSNorm) call, and the
    gradient w.r.t. x too, for 1..200 tiles."""
    torch.manual_seed(5)
    w, b, nw = torch.randn(48, 96), torch.randn(48) if with_bias else None, torch.randn(96)
    x_all, g_all = torch.randn(200 * ROW_TILE, 96) * 3, torch.randn(200 * ROW_TILE, 48)

    def per_tile(fn, x):
        return torch.cat([fn(x[i:i + ROW_TILE]) for i in range(0, x.shape[0], ROW_TILE)])

    def rms(xt):
        return nw * (xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-6))

    for tiles in list(range(1, 20)) + [31, 64, 101, 199, 200]:
        x = x_all[:tiles * ROW_TILE - 5].clone().requires_grad_(True)  # the last tile padded
        y = invariant_linear(x, w, b)
        want = per_tile(lambda t: F.linear(t, w, b), torch.cat([x.detach(), x.new_zeros(5, 96)]))[:-5]
        assert torch.equal(y, want), tiles
        xr = x.detach().clone().requires_grad_(True)
        ref = per_tile(lambda t: F.linear(t, w, b), torch.cat([xr, xr.new_zeros(5, 96)]))[:-5]
        g = g_all[:y.shape[0]]
        assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, xr, g)[0]), tiles
        assert torch.equal(invariant_rms_norm(x.detach(), nw, 1e-6), per_tile(rms, x.detach())), tiles


def test_invariant_rms_norm_exact_and_row_independent():
    torch.manual_seed(1)
    x, w = torch.randn(45, 24), torch.randn(24)
    out = invariant_rms_norm(x, w, 1e-6)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert_close(out, ref, name="rms_norm")
    for start, size in [(0, 1), (3, 5), (ROW_TILE - 1, 2)]:
        assert torch.equal(invariant_rms_norm(x[start:start + size], w, 1e-6), out[start:start + size])


def _attention_reference(q, k, v, start, scale):
    """Causal softmax attention in float64: query i (position start + i) sees keys 0 .. start + i."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(start, start + q.shape[0])[:, None]
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("n,start,length", [(1, 0, 1), (37, 0, 37), (5, 30, 35), (1, 70, 71), (19, 13, 90)])
def test_attend_sequence_matches_float64_softmax_attention(n, start, length):
    torch.manual_seed(n + start)
    q = torch.randn(n, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(length, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(length, 2, 8, dtype=torch.float64, requires_grad=True)
    out = attend_sequence(q, k, v, start, 0.35)
    want = _attention_reference(q, k, v, start, 0.35)
    assert_close(out, want, name="attention")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(want, (q, k, v), g)
    for name, a, b in zip("qkv", got, exp):
        assert_close(a, b, name=f"d{name}")


def test_decode_and_prefill_rows_are_bitwise_equal():
    """A query's output is the same from a whole-sequence prefill, a chunk, or one decode step over a
    cache with more (or unrelated, even NaN) keys after it."""
    torch.manual_seed(3)
    length = 2 * KV_BLOCK + 7
    q, k, v = torch.randn(length, 4, 16), torch.randn(length, 2, 16), torch.randn(length, 2, 16)
    full = attend_sequence(q, k, v, 0, 0.25)
    for p in (0, 5, KV_BLOCK - 1, KV_BLOCK, length - 1):
        one = attend_sequence(q[p:p + 1], k[:p + 1], v[:p + 1], p, 0.25)
        assert torch.equal(one, full[p:p + 1]), p
    chunk = attend_sequence(q[20:50], k[:50], v[:50], 20, 0.25)
    assert torch.equal(chunk, full[20:50])
    # a paged cache: pages out of order, the rest of the pool garbage
    bs = 8
    pages = -(-length // bs)
    table = torch.randperm(pages + 3)[:pages].tolist()
    cache_k = torch.full((pages + 3, bs, 2, 16), float("nan"))
    cache_v = torch.full((pages + 3, bs, 2, 16), float("nan"))
    for pos in range(length):
        cache_k[table[pos // bs], pos % bs], cache_v[table[pos // bs], pos % bs] = k[pos], v[pos]
    p = 41
    keys, values = paged_sequence_keys(cache_k, table, p + 1), paged_sequence_keys(cache_v, table, p + 1)
    assert torch.equal(attend_sequence(q[p:p + 1], keys, values, p, 0.25), full[p:p + 1])


def test_varlen_attention_documents_are_layout_invariant_and_checked():
    torch.manual_seed(4)
    lens = [3, 17, 1, 40]
    docs = [(torch.randn(n, 4, 8), torch.randn(n, 2, 8), torch.randn(n, 2, 8)) for n in lens]

    def packed(order):
        q, k, v = (torch.cat([docs[i][j] for i in order]) for j in range(3))
        cu = torch.tensor([0] + [lens[i] for i in order]).cumsum(0).to(torch.int32)
        out = invariant_varlen_attention(q, k, v, cu, 0.3)
        return {i: out[cu[j]:cu[j + 1]] for j, i in enumerate(order)}

    a, b = packed([0, 1, 2, 3]), packed([3, 2, 0, 1])
    assert all(torch.equal(a[i], b[i]) for i in range(4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        invariant_varlen_attention(*docs[0], torch.tensor([0, 2], dtype=torch.int32), 0.3)
    with pytest.raises(ValueError, match="start"):
        attend_sequence(docs[1][0], docs[1][1][:4], docs[1][2][:4], 0, 0.3)


@pytest.mark.parametrize("threads", [1, 2])
def test_lm_head_rows_have_the_same_bits_in_calls_of_32_to_128_rows(threads):
    # the CPU LM head of invariant mode pads rows to 32 only and runs calls of up to 128 rows, relying
    # on this measured property of the CPU's GEMM (forward, with bias, and the backward's dz @ W);
    # where it fails, invariant mode on this machine would not be invariant: this test says so
    import torch.nn.functional as F

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        for h, v in ((128, 16384), (256, 8192), (64, 100), (896, 4096)):
            w, b = torch.randn(v, h, generator=gen), torch.randn(v, generator=gen)
            x, dz = torch.randn(128, h, generator=gen), torch.randn(128, v, generator=gen)
            for m in (32, 64, 96, 128):
                big, big_b, big_d = F.linear(x[:m], w), F.linear(x[:m], w, b), dz[:m] @ w
                for i in range(0, m, 32):
                    assert torch.equal(big[i:i + 32], F.linear(x[i:i + 32], w))
                    assert torch.equal(big_b[i:i + 32], F.linear(x[i:i + 32], w, b))
                    assert torch.equal(big_d[i:i + 32], dz[i:i + 32] @ w)
    finally:
        torch.set_num_threads(before)


def test_linear_and_attention_follow_autocast_like_their_torch_peers():
    """Under torch.autocast the inputs are cast to the autocast dtype first (as autocast does for
    F.linear / SDPA) and the op runs with autocast off: the bits of the cast inputs outside autocast,
    the output in the autocast dtype, gradients back to the float32 masters."""
    from fusedrl.kernels.invariant_attention import attend_planned, attention_plan

    torch.manual_seed(3)
    x, w, b = torch.randn(37, 24, requires_grad=True), torch.randn(40, 24, requires_grad=True), torch.randn(40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = invariant_linear(x, w, b)
    want = invariant_linear(x.detach().bfloat16(), w.detach().bfloat16(), b.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    q, k, v = torch.randn(70, 4, 16), torch.randn(70, 2, 16), torch.randn(70, 2, 16)
    plan = attention_plan([0, 30, 70], [0, 30, 70], [0, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend_planned(q, k, v, plan, 0.25)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, attend_planned(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan, 0.25))
