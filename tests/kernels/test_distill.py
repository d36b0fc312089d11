"""linear_distill_loss against a float64 full-logits oracle written here (probability space, explicit
loops over sequences): every kind, beta in {0, 0.5, 1}, tau != 1, top-K, packed with an empty and a
one-token sequence, odd shapes (37 tokens, H 19/23, V 301), a random upstream gradient; the
reference path and the Triton path (under the interpreter on CPU), with several token chunks."""
import pytest
import torch

from fusedrl.kernels import _distill_ref, _distill_triton, force_backend, linear_distill_loss
from tests.conftest import assert_close

CU = [0, 0, 1, 15, 15, 37]  # lengths 0, 1, 14, 0, 22
N, HS, HT, V = 37, 19, 23, 301
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("jsd", 0.2)]


def make(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t = dict(
        student_hidden=torch.randn(N, HS, generator=g), student_weight=torch.randn(V, HS, generator=g) * 0.4,
        student_bias=torch.randn(V, generator=g) * 0.3, teacher_hidden=torch.randn(N, HT, generator=g),
        teacher_weight=torch.randn(V, HT, generator=g) * 0.4, teacher_bias=torch.randn(V, generator=g) * 0.3)
    t = {k: v.to(dtype) for k, v in t.items()}
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 5, 20]] = -100
    weights = torch.rand(N, generator=g, dtype=dtype) + 0.5
    return t, labels, weights


def oracle(t, labels, weights, kind, beta, tau, top_k=None, cu=CU, aggregation="token_mean", max_len=None):
    """Float64 loss from full logits; returns (loss, per-token D)."""
    d = {k: v.double() for k, v in t.items()}
    zs = (d["student_hidden"] @ d["student_weight"].T + d["student_bias"]) / tau
    zt = (d["teacher_hidden"] @ d["teacher_weight"].T + d["teacher_bias"]) / tau
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    if top_k is not None:
        idx = zs.topk(top_k, dim=-1).indices
        ps_k, pt_k = ps.gather(1, idx), pt.gather(1, idx)
        ps = torch.cat([ps_k, 1 - ps_k.sum(-1, keepdim=True)], 1)
        pt = torch.cat([pt_k, 1 - pt_k.sum(-1, keepdim=True)], 1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        div = (pt * (pt.log() - ps.log())).sum(-1)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        div = (ps * (ps.log() - pt.log())).sum(-1)
    else:
        m = beta * pt + (1 - beta) * ps
        div = beta * (pt * (pt.log() - m.log())).sum(-1) + (1 - beta) * (ps * (ps.log() - m.log())).sum(-1)
    trained = labels != -100
    per = torch.where(trained, weights.double() * div, torch.zeros_like(div))
    if aggregation == "token_mean":
        loss = per.sum() / trained.sum()
    else:
        seqs = []
        for s, e in zip(cu[:-1], cu[1:]):
            denom = max(int(trained[s:e].sum()), 1) if aggregation == "seq_mean" else max_len
            seqs.append(per[s:e].sum() / denom)
        loss = torch.stack(seqs).sum() / (len(cu) - 1)
    return loss, torch.where(trained, div, torch.zeros_like(div))


def run(backend, t, labels, weights, chunked=False, **kw):
    """linear_distill_loss on one backend (Triton: CUDA when present, else the interpreter);
    `chunked` shrinks the chunk budgets so the 37 tokens span several chunks."""
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    mp = pytest.MonkeyPatch()
    if chunked:
        mp.setattr(_distill_ref, "CHUNK_ELEMS", 8 * V)
        mp.setattr(_distill_triton, "CHUNK_BYTES", 1)
    try:
        with force_backend(backend):
            return linear_distill_loss(t["student_hidden"].to(dev), t["student_weight"].to(dev),
                                       t["teacher_hidden"].to(dev), t["teacher_weight"].to(dev),
                                       student_bias=t["student_bias"].to(dev), teacher_bias=t["teacher_bias"].to(dev),
                                       labels=labels.to(dev), weights=weights.to(dev),
                                       cu_seqlens=torch.tensor(kw.pop("cu", CU), dtype=torch.int32, device=dev),
                                       return_per_token=True, **kw)
    finally:
        mp.undo()


def leaves(t):
    return {k: v.clone().requires_grad_(k.startswith("student")) for k, v in t.items()}


def check(backend, kind, beta, *, dtype, top_k=None, chunked=True, tau=0.7, **agg):
    t, labels, weights = make(dtype=dtype)
    exp_leaves = leaves({k: v.double() for k, v in t.items()})
    expected, exp_div = oracle(exp_leaves, labels, weights, kind, beta, tau, top_k, **agg)
    up = torch.tensor(-1.7, dtype=torch.float64)  # a random upstream gradient, not 1
    names = ["student_hidden", "student_weight", "student_bias"]
    exp_grads = torch.autograd.grad(expected * up, [exp_leaves[k] for k in names])
    ours = leaves(t)
    loss, metrics, div = run(backend, ours, labels, weights, chunked, kind=kind, beta=beta, temperature=tau,
                             top_k=top_k, **agg)
    grads = torch.autograd.grad(loss * up.to(loss.dtype), [ours[k] for k in names])
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, expected, name="loss", **tol)
    assert_close(div, exp_div, name="per-token D", **tol)
    assert_close(metrics["divergence"], exp_div.sum() / (labels != -100).sum(), name="metric", atol=1e-5, rtol=1e-4)
    for name, got, exp in zip(names, grads, exp_grads):
        assert got.dtype == ours[name].dtype
        assert_close(got, exp, name=f"d {name}", **tol)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_reference_float64_matches_oracle(kind, beta):
    check("reference", kind, beta, dtype=torch.float64)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_triton_matches_oracle(kind, beta):
    check("triton", kind, beta, dtype=torch.float32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_top_k_plus_tail_matches_oracle(backend, kind, beta):
    dtype = torch.float64 if backend == "reference" else torch.float32
    check(backend, kind, beta, dtype=dtype, top_k=7)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("agg", [dict(aggregation="seq_mean"), dict(aggregation="seq_mean_fixed_len", max_len=25)])
def test_sequence_aggregations(backend, agg):
    dtype = torch.float64 if backend == "reference" else torch.float32
    check(backend, "jsd", 0.5, dtype=dtype, tau=1.0, **agg)


def test_one_chunk_equals_many_chunks_and_tau_one():
    check("reference", "reverse_kl", 0.5, dtype=torch.float64, chunked=False, tau=1.0)
    check("triton", "reverse_kl", 0.5, dtype=torch.float32, chunked=False, tau=1.3)


def test_padded_layout_mask_and_global_normaliser():
    t, labels, weights = make()
    b, tt = 3, 5
    pad = {k: (v[: b * tt].reshape(b, tt, -1) if k.endswith("hidden") else v) for k, v in t.items()}
    mask = torch.ones(b, tt, dtype=torch.long)
    mask[2, 3:] = 0
    pad["student_hidden"][2, 3:] = float("nan")  # padding garbage must not leak into loss or gradients
    ours = leaves(pad)
    loss, _ = linear_distill_loss(ours["student_hidden"], ours["student_weight"], ours["teacher_hidden"],
                                  ours["teacher_weight"], mask=mask, kind="forward_kl", num_tokens=20.0)
    loss.backward()
    flat = {k: (v.reshape(b * tt, -1) if k.endswith("hidden") else v) for k, v in pad.items()}
    trained = mask.reshape(-1) != 0
    zs = torch.log_softmax(flat["student_hidden"][trained] @ flat["student_weight"].T, -1)
    zt = torch.log_softmax(flat["teacher_hidden"][trained] @ flat["teacher_weight"].T, -1)
    expected = (zt.exp() * (zt - zs)).sum() / 20.0
    assert_close(loss, expected, name="padded loss")
    assert torch.isfinite(ours["student_hidden"].grad).all() and torch.isfinite(ours["student_weight"].grad).all()
    assert (ours["student_hidden"].grad[2, 3:] == 0).all()


def test_teacher_gets_no_gradient_and_no_grad_mode():
    t, labels, weights = make()
    x = {k: v.clone().requires_grad_() for k, v in t.items()}
    loss, _ = linear_distill_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                                  teacher_bias=x["teacher_bias"], labels=labels)
    loss.backward()
    assert x["teacher_hidden"].grad is None and x["teacher_weight"].grad is None and x["teacher_bias"].grad is None
    assert x["student_weight"].grad is not None
    seen = []
    import fusedrl.kernels.distill as distill_module

    def spy(*args):
        seen.append(args[6] is None)  # coef is None: no gradient work
        return real_step(*args)
    real_step = distill_module.ref_step
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill_module, "ref_step", spy)
        again, metrics = linear_distill_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                             x["teacher_weight"], teacher_bias=x["teacher_bias"], labels=labels)
    assert seen and all(seen)
    assert_close(again, loss.detach(), name="no-grad loss")
    assert int(metrics["tokens"]) == int((labels != -100).sum())


def test_per_sequence_weights_and_identical_models_give_zero():
    t, labels, _ = make()
    seq_w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    per_token = seq_w.repeat_interleave(torch.tensor(CU).diff())
    a = run("reference", t, labels, seq_w, kind="jsd", beta=0.3)[0]
    b = run("reference", t, labels, per_token, kind="jsd", beta=0.3)[0]
    assert_close(a, b, name="per-sequence weights")
    same = linear_distill_loss(t["student_hidden"], t["student_weight"], t["student_hidden"], t["student_weight"],
                               kind="reverse_kl")[0]
    assert abs(float(same)) < 1e-12


BAD = [
    (dict(kind="kl"), ValueError, "kind"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta="0.5"), TypeError, "beta"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=V), ValueError, "top_k"),
    (dict(aggregation="sum"), ValueError, "aggregation"),
    (dict(aggregation="seq_mean_fixed_len"), ValueError, "max_len"),
    (dict(teacher_weight=torch.randn(V + 1, HT)), ValueError, "teacher_weight"),
    (dict(teacher_hidden=torch.randn(N, HS)), ValueError, "teacher_hidden"),
    (dict(teacher_hidden=torch.randn(N + 1, HT)), ValueError, "teacher_hidden"),
    (dict(student_weight=torch.randn(V, HS + 1)), ValueError, "student_hidden"),
    (dict(student_bias=torch.randn(V - 1)), ValueError, "student_bias"),
    (dict(labels=torch.zeros(N)), TypeError, "labels"),
    (dict(labels=torch.zeros(N + 1, dtype=torch.long)), ValueError, "labels"),
    (dict(weights=torch.ones(4)), ValueError, "weights"),
    (dict(cu_seqlens=torch.tensor([0, 36], dtype=torch.int32)), ValueError, "cu_seqlens"),
    (dict(student_hidden=torch.randn(N, HS).long()), TypeError, "student_hidden"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(num_tokens=0), ValueError, "num_tokens"),
]


@pytest.mark.parametrize("change,error,name", BAD)
def test_bad_inputs_are_named(change, error, name):
    args = dict(student_hidden=torch.randn(N, HS), student_weight=torch.randn(V, HS), teacher_hidden=torch.randn(N, HT),
                teacher_weight=torch.randn(V, HT))
    args.update(change)
    positional = [args.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    with pytest.raises(error, match=name):
        linear_distill_loss(*positional, **args)


def test_bench_smoke(tmp_path):
    from fusedrl.bench import bench_distill

    code = bench_distill.main(["--smoke", "--modes", "full", "--results-dir", str(tmp_path)])
    assert code == 0


def test_triton_bf16_student_fp32_teacher_within_bf16_tolerance():
    """Low-precision inputs on the Triton path: bf16 student (bf16 logits buffer, bf16 gradients), fp32 teacher."""
    t, labels, weights = make(dtype=torch.float32)
    t = {k: (v.bfloat16() if k.startswith("student") else v) for k, v in t.items()}
    ref_leaves = leaves({k: v.double() for k, v in t.items()})
    expected, _ = oracle(ref_leaves, labels, weights, "jsd", 0.5, 0.7)
    exp_grads = torch.autograd.grad(expected, [ref_leaves["student_hidden"], ref_leaves["student_weight"]])
    ours = leaves(t)
    loss, _, _ = run("triton", ours, labels, weights, chunked=True, kind="jsd", beta=0.5, temperature=0.7)
    grads = torch.autograd.grad(loss, [ours["student_hidden"], ours["student_weight"]])
    assert_close(loss, expected, name="bf16 loss", atol=2e-2, rtol=2e-2)
    for got, exp in zip(grads, exp_grads):
        assert got.dtype == torch.bfloat16
        rel = float((got.double() - exp).norm() / exp.norm())
        assert rel < 2e-2, rel


def test_second_backward_through_one_graph_is_refused():
    t, labels, weights = make()
    ours = leaves(t)
    loss, _ = linear_distill_loss(ours["student_hidden"], ours["student_weight"], ours["teacher_hidden"],
                                  ours["teacher_weight"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@pytest.mark.gpu
def test_gpu_bf16_matches_reference_and_memory_stays_within_chunks():
    """On CUDA, bf16 at a realistic vocabulary: the Triton path against the float32 reference (norm-wise
    relative error), and peak memory above inputs and gradients bounded by the two chunk buffers."""
    n, hs_dim, ht_dim, vocab = 4096, 512, 768, 151936
    g = torch.Generator("cuda").manual_seed(0)
    hs = torch.randn(n, hs_dim, device="cuda", generator=g).bfloat16().requires_grad_()
    ws = (torch.randn(vocab, hs_dim, device="cuda", generator=g) / hs_dim ** 0.5).bfloat16().requires_grad_()
    ht = torch.randn(n, ht_dim, device="cuda", generator=g).bfloat16()
    wt = (torch.randn(vocab, ht_dim, device="cuda", generator=g) / ht_dim ** 0.5).bfloat16()
    results = {}
    for backend in ("reference", "triton"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with force_backend(backend):
            loss, _ = linear_distill_loss(hs, ws, ht, wt, kind="jsd", beta=0.5, temperature=0.9)
        grads = torch.autograd.grad(loss, [hs, ws])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base  # before the float32 copies below
        results[backend] = (loss.float(), [x.float() for x in grads], peak)
    (ref_loss, ref_grads, _), (loss, grads, peak) = results["reference"], results["triton"]
    assert abs(float(loss - ref_loss)) <= 1e-2 * abs(float(ref_loss)) + 1e-3
    for got, exp in zip(grads, ref_grads):
        assert float((got - exp).norm() / exp.norm()) < 2e-2
    grad_bytes = (hs.numel() + ws.numel()) * 2
    assert peak - grad_bytes < 2 * _distill_triton.CHUNK_BYTES + (64 << 20), peak


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.5), ("forward_kl", 0.5)])
def test_large_logits_stay_finite_and_agree(kind, beta):
    """Logits in the hundreds (probabilities underflow to 0 in float32): the online log-sum-exp and the
    log-space mixture keep the Triton path finite and equal to the float64 reference."""
    t, labels, weights = make()
    t = {k: v * 30 if k.endswith("weight") else v for k, v in t.items()}
    exp_loss, _, exp_div = run("reference", leaves(t), labels, weights, kind=kind, beta=beta)
    t32 = leaves({k: v.float() for k, v in t.items()})
    loss, _, div = run("triton", t32, labels, weights, chunked=True, kind=kind, beta=beta)
    (grad,) = torch.autograd.grad(loss, [t32["student_weight"]])
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.isfinite(div).all()
    assert_close(div, exp_div, name="per-token D", atol=1e-3, rtol=1e-4)
