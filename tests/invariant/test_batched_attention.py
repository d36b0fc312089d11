"""The batched invariant attention (`attend_sequences`, `invariant_varlen_attention`) is bitwise
`attend_sequence` per sequence -- forward and gradients -- whatever the packing."""
import random

import pytest
import torch

from fusedrl.kernels.invariant_attention import (KV_BLOCK, Q_TILE, attend_planned, attend_sequence,
                                                 attend_sequences, attention_plan, invariant_varlen_attention,
                                                 paged_sequence_keys, paged_slots)


def _reference(q, k, v, cu_q, cu_k, starts, scale, upstream):
    """attend_sequence on each sequence alone: outputs and d(q, k, v) per sequence."""
    out = []
    for s, start in enumerate(starts):
        if cu_q[s + 1] == cu_q[s]:
            continue
        qs, ks, vs = (x.detach()[a:b].clone().requires_grad_()
                      for x, (a, b) in ((q, cu_q[s:s + 2]), (k, cu_k[s:s + 2]), (v, cu_k[s:s + 2])))
        o = attend_sequence(qs, ks, vs, start, scale)
        out.append((s, o.detach(), *torch.autograd.grad(o, (qs, ks, vs), upstream[cu_q[s]:cu_q[s + 1]])))
    return out


CUDA = pytest.mark.gpu  # skipped without a CUDA device (conftest); bench/gpu_check.sh runs `-m gpu`


@pytest.mark.parametrize("dtype,heads,dim,device", [
    (torch.float32, (4, 2), 32, "cpu"), (torch.float32, (6, 2), 16, "cpu"), (torch.float64, (4, 2), 16, "cpu"),
    # on a GPU: whether a batched GEMM entry keeps its bits whatever the batch count
    pytest.param(torch.float32, (4, 2), 32, "cuda", marks=CUDA),
    pytest.param(torch.bfloat16, (8, 2), 64, "cuda", marks=CUDA)])
def test_varlen_equals_attend_sequence_bitwise_in_any_packing(dtype, heads, dim, device):
    rnd = random.Random(11)
    torch.manual_seed(11)
    lens = [rnd.randint(1, 300) for _ in range(20)]
    docs = [tuple(torch.randn(n, h, dim, dtype=dtype, device=device) for h in (heads[0], heads[1], heads[1], heads[0]))
            for n in lens]
    for _ in range(3):
        order = rnd.sample(range(len(lens)), len(lens))
        q, k, v, g = (torch.cat([docs[i][j] for i in order]) for j in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        cu = torch.tensor([0] + [lens[i] for i in order]).cumsum(0).to(torch.int32)
        out = invariant_varlen_attention(q, k, v, cu, 0.3)
        grads = torch.autograd.grad(out, (q, k, v), g)
        bounds = cu.tolist()
        for s, *want in _reference(q, k, v, bounds, bounds, [0] * len(lens), 0.3, g):
            a, b = bounds[s], bounds[s + 1]
            for name, got, exp in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
                assert torch.equal(got[a:b], exp), (name, order.index(s), lens[order[s]])


def test_sequences_with_offsets_starts_and_empty_queries_equal_attend_sequence():
    """Chunks and decode rows: queries start mid-sequence, more keys than queries, keys not from row 0."""
    rnd = random.Random(12)
    torch.manual_seed(12)
    length = [rnd.randint(1, 300) for _ in range(16)] + [Q_TILE, KV_BLOCK + 1]
    n = [rnd.randint(0, L) for L in length[:-4]] + [0, 1, Q_TILE, 1]
    starts = [rnd.randint(0, L - m) for L, m in zip(length, n)]
    cu_q, cu_k = [0], [7]  # the first 7 key rows belong to no sequence
    for m, L in zip(n, length):
        cu_q.append(cu_q[-1] + m), cu_k.append(cu_k[-1] + L)
    q = torch.randn(cu_q[-1], 4, 32, requires_grad=True)
    k, v = (torch.randn(cu_k[-1] + 3, 2, 32, requires_grad=True) for _ in range(2))
    out = attend_sequences(q, k, v, cu_q, torch.tensor(cu_k), starts, 0.2)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    want = _reference(q, k, v, cu_q, cu_k, starts, 0.2, g)
    assert torch.equal(out, torch.cat([w[1] for w in want]))
    assert torch.equal(grads[0], torch.cat([w[2] for w in want]))
    for s, _, _, dk, dv in want:
        assert torch.equal(grads[1][cu_k[s]:cu_k[s + 1]], dk) and torch.equal(grads[2][cu_k[s]:cu_k[s + 1]], dv), s
    assert not grads[1][:7].any() and not grads[1][cu_k[-1]:].any()


def test_batched_decode_over_a_paged_cache_equals_prefill():
    torch.manual_seed(13)
    bs, lens = 8, [1, 40, 2 * KV_BLOCK + 3, 65]
    docs = [(torch.randn(L, 4, 16), torch.randn(L, 2, 16), torch.randn(L, 2, 16)) for L in lens]
    pages = [-(-L // bs) for L in lens]
    perm = torch.randperm(sum(pages) + 2).tolist()
    tables = torch.full((len(lens), max(pages)), -1, dtype=torch.int32)
    cache_k, cache_v = torch.full((2, sum(pages) + 2, bs, 2, 16), float("nan"))
    for s, (L, (_, k, v)) in enumerate(zip(lens, docs)):
        tables[s, :pages[s]] = torch.tensor(perm[:pages[s]])
        del perm[:pages[s]]
        for p in range(L):
            page = int(tables[s, p // bs])
            cache_k[page, p % bs], cache_v[page, p % bs] = k[p], v[p]
    slots = paged_slots(tables, torch.tensor(lens), bs)
    for s, L in enumerate(lens):
        table = tables[s, :pages[s]].tolist()
        mine = slots[sum(lens[:s]):sum(lens[:s + 1])]
        assert torch.equal(cache_k.view(-1, 2, 16)[mine], paged_sequence_keys(cache_k, table, L))
    cu_k = torch.tensor([0] + lens).cumsum(0)
    q_last = torch.stack([q[-1] for q, _, _ in docs])
    out = attend_sequences(q_last, cache_k.view(-1, 2, 16)[slots], cache_v.view(-1, 2, 16)[slots],
                           torch.arange(len(lens) + 1), cu_k, torch.tensor(lens) - 1, 0.25)
    for s, (q, k, v) in enumerate(docs):
        assert torch.equal(out[s], attend_sequence(q, k, v, 0, 0.25)[-1]), s
    with pytest.raises(ValueError, match="lengths"):
        paged_slots(tables, torch.tensor(lens) + bs * max(pages), bs)


def test_bad_input_names_the_argument():
    q, k = torch.randn(5, 4, 8), torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match="cu_q"):
        attend_sequences(q, k, k, [0, 4], [0, 5], [0], 1.0)
    with pytest.raises(ValueError, match="cu_k"):
        attend_sequences(q, k, k, [0, 5], [0, 6], [0], 1.0)
    with pytest.raises(ValueError, match="starts"):
        attend_sequences(q, k, k, [0, 5], [0, 5], [1], 1.0)
    with pytest.raises(ValueError, match="starts"):
        attend_sequences(q, k, k, [0, 5], [0, 5], [0, 0], 1.0)
    with pytest.raises(ValueError, match="k, v"):
        attend_sequences(q, k, k[:, :, :4], [0, 5], [0, 5], [0], 1.0)
    with pytest.raises(ValueError, match="heads"):
        attend_sequences(q, torch.randn(5, 3, 8), torch.randn(5, 3, 8), [0, 5], [0, 5], [0], 1.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        invariant_varlen_attention(q, k, k, torch.tensor([0.0, 5.0]), 1.0)
    plan = attention_plan([0, 2, 5], [0, 2, 5], [0, 0])
    want = invariant_varlen_attention(q, k, k, torch.tensor([0, 2, 5]), 1.0)
    assert torch.equal(attend_planned(q, k, k, plan, 1.0), want)
    with pytest.raises(ValueError, match="q: the plan"):
        attend_planned(q[:4], k, k, plan, 1.0)
    with pytest.raises(ValueError, match="k, v"):
        attend_planned(q, k[:4], k[:4], plan, 1.0)


def test_chunked_block_step_equals_the_batched_one_for_any_entry_count():
    # off the CPU each block's ops run on fixed BMM_CHUNK-entry chunks (one kernel shape for every call);
    # the chunking and its fully masked padding must not change an entry: checked here against the
    # one-batch step (itself entry-count invariant on the CPU), with running states mid-sequence
    from fusedrl.kernels import invariant_attention as inv

    gen = torch.Generator().manual_seed(0)
    q, b, d = inv.Q_TILE, inv.KV_BLOCK, 16
    for n in (1, inv.BMM_CHUNK - 1, inv.BMM_CHUNK, inv.BMM_CHUNK + 3, 2 * inv.BMM_CHUNK + 1):
        qt, kb, vb = (torch.randn(n, rows, d, generator=gen) for rows in (q, b, b))
        masked = torch.rand(n, q, b, generator=gen) < 0.3
        masked[: n // 3] = True  # whole blocks masked: the state must stay as it was
        state = (torch.randn(n, q, generator=gen), torch.rand(n, q, generator=gen),
                 torch.randn(n, q, d, generator=gen))
        state[0][n // 2:, :3] = float("-inf")  # rows with no key yet
        want = inv._block_rows(state, qt, kb, vb, masked, 0.25)
        got = inv._chunked_block_step(state, qt, kb, vb, masked, 0.25)
        for g, w in zip(got, want):
            assert g.shape == w.shape and torch.equal(g, w)
        broadcast = inv._chunked_block_step(state, qt, kb, vb, masked[:1, :, :].expand(1, q, b), 0.25)
        assert all(torch.equal(g, w) for g, w in
                   zip(broadcast, inv._block_rows(state, qt, kb, vb, masked[:1], 0.25)))


def test_rms_norm_chunks_off_the_cpu_equal_the_one_call():
    # off the CPU invariant_rms_norm runs fixed NORM_CHUNK-row calls; on the CPU (where one call is
    # row-count invariant) that chunked form must give the one call's bits
    import importlib

    inv = importlib.import_module("fusedrl.kernels.invariant")  # the module (the package exports the context)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, generator=gen)
    for n in (1, inv.NORM_CHUNK - 5, inv.NORM_CHUNK + 7):
        x = torch.randn(n, 40, generator=gen)
        chunked = inv._rms_rows(x, w, 1e-6, inv.NORM_CHUNK)
        assert chunked.shape[0] % inv.NORM_CHUNK == 0
        assert torch.equal(chunked[:n], inv.invariant_rms_norm(x, w, 1e-6))
