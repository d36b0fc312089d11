"""The Triton path of invariant attention (`_invariant_attention_triton.py`): accurate against a
float64 oracle, and a token's output and gradients bitwise the same in any packing, alone or with
other neighbours, and in training, chunked-prefill and decode layouts (by construction: fixed 32 x 64
tiles aligned to absolute positions, one block order). On CPU the kernels run under the interpreter
(`_attend_planned_triton`); the `gpu` cases run `attend_planned`'s own dispatch on CUDA."""
import random

import pytest
import torch

from fusedrl.kernels.invariant_attention import (KV_BLOCK, Q_TILE, _attend_planned_triton, _triton_fits,
                                                 attend_planned, attention_plan)

from ..conftest import assert_close

CUDA = pytest.mark.gpu  # skipped without a CUDA device (conftest); bench/gpu_check.sh runs `-m gpu`
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
LENS = [1, 5, Q_TILE + 1, KV_BLOCK, KV_BLOCK + 1, 100]


def _attend(q, k, v, cu_q, cu_k, starts, scale):
    """The Triton path: `attend_planned` itself on CUDA (it must pick the kernels), forced on CPU."""
    plan = attention_plan(cu_q, cu_k, starts, q.device)
    if q.is_cuda:
        assert _triton_fits(q)
        return attend_planned(q, k, v, plan, scale)
    return _attend_planned_triton(q, k, v, plan, scale)


def _oracle(q, k, v, cu_q, cu_k, starts, scale):
    """Plain masked softmax attention per sequence in float64: (Nq, Hq, D)."""
    outs = []
    for s, start in enumerate(starts):
        qs = q[cu_q[s]:cu_q[s + 1]].double().transpose(0, 1)  # (Hq, n, D)
        group = q.shape[1] // k.shape[1]
        ks, vs = (x[cu_k[s]:cu_k[s + 1]].double().repeat_interleave(group, 1).transpose(0, 1) for x in (k, v))
        scores = qs @ ks.transpose(1, 2) * scale  # (Hq, n, L)
        q_pos = start + torch.arange(qs.shape[1])
        masked = torch.arange(ks.shape[1])[None, :] > q_pos[:, None]
        outs.append((scores.masked_fill(masked, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def _run(q, k, v, cu_q, cu_k, starts, scale, upstream):
    """(out, dq, dk, dv) of the Triton path."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = _attend(q, k, v, cu_q, cu_k, starts, scale)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), upstream))


def _docs(lens, heads, dim, dtype=torch.float32, device="cpu", seed=0):
    """Per sequence (q, k, v, upstream gradient)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = (heads[0], heads[1], heads[1], heads[0])
    return [tuple(torch.randn(n, h, dim, generator=gen).to(device, dtype) for h in shapes) for n in lens]


def _pack(docs, order):
    """Training layout of docs in `order`: (q, k, v, g, cu) with cu_q = cu_k = cu, starts 0."""
    q, k, v, g = (torch.cat([docs[i][j] for i in order]) for j in range(4))
    cu = [0]
    for i in order:
        cu.append(cu[-1] + docs[i][0].shape[0])
    return q, k, v, g, cu


@pytest.mark.parametrize("heads,dim", [((4, 2), 16), ((2, 2), 24), ((4, 1), 24)])
def test_forward_and_backward_match_a_float64_oracle(heads, dim):
    docs = _docs(LENS, heads, dim, seed=1)
    q, k, v, g, cu = _pack(docs, range(len(LENS)))
    starts = [0] * len(LENS)
    out, *grads = _run(q, k, v, cu, cu, starts, 0.3, g)
    inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = _oracle(*inputs, cu, cu, starts, 0.3)
    assert_close(out, want, dtype=torch.float32, name="out")
    for name, got, exp in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(want, inputs, g.double())):
        assert_close(got, exp, dtype=torch.float32, name=name)


def test_chunks_and_decode_rows_match_the_oracle_gradients_included():
    """General layout: queries mid-sequence, more keys than queries, key rows of no sequence, a
    sequence without queries."""
    rnd = random.Random(2)
    gen = torch.Generator().manual_seed(2)
    length = [1, 40, 70, 100, 33, 9]
    n = [1, 1, 30, 37, 0, 9]
    starts = [rnd.randint(0, L - m) for L, m in zip(length, n)]
    cu_q, cu_k = [0], [3]  # the first 3 key rows belong to no sequence
    for m, L in zip(n, length):
        cu_q.append(cu_q[-1] + m), cu_k.append(cu_k[-1] + L)
    q = torch.randn(cu_q[-1], 4, 24, generator=gen)
    k, v = (torch.randn(cu_k[-1] + 2, 2, 24, generator=gen) for _ in range(2))
    g = torch.randn(q.shape, generator=gen)
    out, *grads = _run(q, k, v, cu_q, cu_k, starts, 0.25, g)
    inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = _oracle(*inputs, cu_q, cu_k, starts, 0.25)
    assert_close(out, want, dtype=torch.float32, name="out")
    for name, got, exp in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(want, inputs, g.double())):
        assert_close(got, exp, dtype=torch.float32, name=name)
    assert not grads[1][:3].any() and not grads[2][cu_k[-1]:].any()


def _per_sequence(result, cu, i):
    """(out, dq, dk, dv) rows of the sequence at pack slot i (training layout: cu_q = cu_k)."""
    return [x[cu[i]:cu[i + 1]] for x in result]


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), pytest.param("cuda", torch.float32, marks=CUDA),
                                          pytest.param("cuda", torch.bfloat16, marks=CUDA)])
def test_packing_order_and_neighbours_do_not_move_a_bit(device, dtype):
    lens = LENS + [2 * Q_TILE - 1]
    docs = _docs(lens, (4, 2), 16, dtype, device, seed=3)
    layouts = [list(range(len(lens))), [6, 3, 0, 5, 1, 4, 2], [5], [2, 6], [4, 0]]  # packs, alone, other neighbours
    seen = {}
    for order in layouts:
        q, k, v, g, cu = _pack(docs, order)
        result = _run(q, k, v, cu, cu, [0] * len(order), 0.3, g)
        for slot, s in enumerate(order):
            got = _per_sequence(result, cu, slot)
            if s not in seen:
                seen[s] = (order, got)
                continue
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, seen[s][1]):
                assert torch.equal(a, b), (name, lens[s], order, seen[s][0])
    assert len(seen) == len(lens)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_and_chunked_prefill_equal_training_bitwise(device):
    """Sampler = trainer: a token's output in one training call equals, bit for bit, its output as a
    decode row (one query at position p over keys 0..p) and inside a prefill chunk (queries [a, b)
    over keys 0..b-1), with other sequences in the same call; dq of a chunk's rows too."""
    lens = [1, 40, KV_BLOCK + 1, 100]
    docs = _docs(lens, (4, 2), 16, device=device, seed=4)
    q, k, v, g, cu = _pack(docs, range(len(lens)))
    train = _run(q, k, v, cu, cu, [0] * len(lens), 0.3, g)

    def call(pieces):  # pieces: (sequence, a, b): queries at positions [a, b), keys 0..b-1
        qs, ks, vs, gs, cu_q, cu_k = [], [], [], [], [0], [0]
        for s, a, b in pieces:
            qs.append(docs[s][0][a:b]), ks.append(docs[s][1][:b]), vs.append(docs[s][2][:b]), gs.append(docs[s][3][a:b])
            cu_q.append(cu_q[-1] + b - a), cu_k.append(cu_k[-1] + b)
        result = _run(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu_q, cu_k, [a for _, a, _ in pieces], 0.3,
                      torch.cat(gs))
        for i, (s, a, b) in enumerate(pieces):
            for name, x in (("out", result[0]), ("dq", result[1])):
                want = train[0 if name == "out" else 1][cu[s] + a:cu[s] + b]
                assert torch.equal(x[cu_q[i]:cu_q[i + 1]], want), (name, s, a, b)

    call([(0, 0, 1), (1, 39, 40), (2, 64, 65), (3, 99, 100)])  # decode: the last position of each
    call([(3, 31, 32), (2, 32, 33), (1, 0, 1), (3, 63, 64)])  # decode rows at tile / block edges
    call([(3, 30, 71), (1, 0, 17), (2, 17, 65)])  # prefill chunks across tile and block edges


@pytest.mark.parametrize("path", ["triton", "pytorch"])
def test_key_rows_read_the_cache_in_place_with_the_gathered_bits(path):
    """A plan with `key_rows` (the engine's paged-cache slots) gives the bits of the same plan on the
    keys gathered first -- decode rows and a prefill chunk, in both paths -- and a gradient still flows
    (the Triton path gathers then); bad key_rows are a ValueError naming the argument."""
    lens, heads, dim = [1, 40, KV_BLOCK + 1], (4, 2), 16
    docs = _docs(lens, heads, dim, seed=6)
    cache_k, cache_v = torch.randn(300, heads[1], dim), torch.randn(300, heads[1], dim)
    slots = torch.randperm(300)[:sum(lens)]  # every key lives at a scattered cache row
    cache_k[slots] = torch.cat([d[1] for d in docs])
    cache_v[slots] = torch.cat([d[2] for d in docs])
    cu_k = [0, 1, 41, 41 + KV_BLOCK + 1]
    q = torch.cat([d[0][-1:] for d in docs])  # one decode row each, at the last position
    attend = _attend_planned_triton if path == "triton" else attend_planned
    starts = [n - 1 for n in lens]
    paged = attend(q, cache_k, cache_v, attention_plan([0, 1, 2, 3], cu_k, starts, key_rows=slots), 0.3)
    gathered = attend(q, cache_k[slots], cache_v[slots], attention_plan([0, 1, 2, 3], cu_k, starts), 0.3)
    assert torch.equal(paged, gathered)
    assert_close(paged, _oracle(q, cache_k[slots], cache_v[slots], [0, 1, 2, 3], cu_k, starts, 0.3))
    qg = q.clone().requires_grad_()
    out = attend(qg, cache_k, cache_v, attention_plan([0, 1, 2, 3], cu_k, starts, key_rows=slots), 0.3)
    assert torch.equal(out.detach(), paged)
    assert qg.grad is None and torch.autograd.grad(out.sum(), qg)[0].abs().sum() > 0
    with pytest.raises(ValueError, match="key_rows must be a 1-D int64"):
        attention_plan([0, 1], [0, 1], [0], key_rows=slots.int())
    with pytest.raises(ValueError, match="key_rows must have >= 106 entries"):
        attention_plan([0, 1, 2, 3], cu_k, starts, key_rows=slots[:5])
    with pytest.raises(ValueError, match="key_rows must be >= 0"):
        attention_plan([0, 1], [0, 1], [0], key_rows=torch.tensor([-1]))
    end = int(slots.max()) + 1  # k must hold every row key_rows names: no out-of-range read
    with pytest.raises(ValueError, match=rf"k, v must both be \(>= {end}, "):
        attend_planned(q, cache_k[:end - 1], cache_v[:end - 1], attention_plan([0, 1, 2, 3], cu_k, starts,
                                                                               key_rows=slots), 0.3)


def test_bad_input_names_the_argument():
    plan = attention_plan([0, 5], [0, 5], [0])
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    with pytest.raises(ValueError, match="q: .*float64"):
        _attend_planned_triton(q.double(), k.double(), k.double(), plan, 1.0)
    with pytest.raises(ValueError, match="k: "):
        _attend_planned_triton(q, k.to(torch.int32), k, plan, 1.0)
    big_q, big_k = torch.randn(5, 2, 136), torch.randn(5, 2, 136)
    with pytest.raises(ValueError, match="head_dim: .*up to 128, got 136"):
        _attend_planned_triton(big_q, big_k, big_k, plan, 1.0)
    # a float16 head dim of 136 is within the kernels' limit: it runs (and matches the float32 result)
    half = _attend_planned_triton(big_q.half(), big_k.half(), big_k.half(), plan, 1.0)
    assert_close(half, _oracle(big_q.half(), big_k.half(), big_k.half(), [0, 5], [0, 5], [0], 1.0),
                 dtype=torch.float16)
    assert not _triton_fits(q)  # CPU tensors: attend_planned keeps the PyTorch path


@pytest.mark.slow
def test_native_engine_sampler_equals_trainer_bitwise_on_the_triton_path(monkeypatch):
    """End to end on the Triton path (forced on CPU): the native engine's decode and prefill calls and
    the trainer's packed recompute give the same log-prob bits (tests/invariant/test_model_layouts.py's
    check, with every attention call on the kernels)."""
    import fusedrl.kernels.invariant_attention as inv
    from fusedrl.kernels.invariant import invariant
    from fusedrl.rollout.sampling import SamplingParams
    from tests.invariant.test_model_layouts import _sampler_vs_trainer
    from tests.rollout._tiny import tiny_model

    calls = []
    monkeypatch.setattr(inv, "_triton_fits", lambda q: True)
    monkeypatch.setattr(inv, "_attend_planned_triton", lambda *a: calls.append(a[0].shape[0]) or
                        _attend_planned_triton(*a))
    model = tiny_model("qwen2", seed=3)
    with invariant():
        sampler, trainer = _sampler_vs_trainer(model, SamplingParams(n=2, temperature=0.7, top_k=20,
                                                                     max_new_tokens=9, seed=3), torch.float32)
    assert sampler.numel() > 20 and len(calls) > 20  # the engine's decode steps and prefills, the trainer's pass
    assert torch.equal(sampler, trainer), (sampler - trainer).abs().max()
