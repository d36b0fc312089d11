"""linear_logprobs / logprobs_from_logits vs a float64 autograd oracle, on both backends.

The Triton path runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it),
so shapes are small and odd: V not a multiple of any block, H not either.
"""
import pytest
import torch

from fusedrl.kernels import _dispatch, _tiles, force_backend, linear_logprobs, logprobs_from_logits
from fusedrl.kernels.reference import linear_logprobs_reference, logprobs_from_logits_reference
from tests.conftest import assert_close

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not _dispatch.HAS_TRITON,
                                                                          reason="triton not importable"))]
IGNORE = -100
# Relative tolerance of values/gradients vs the float64 oracle, per input dtype. bf16 gradients
# are returned in bf16 (and the Triton backward multiplies d(logits) in bf16), hence 2e-2.
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def oracle(h, w, y, b=None, tau=1.0, ignore=IGNORE, logits=None):
    """Plain float64 log_softmax + gather: (logp, entropy), 0 at ignored positions."""
    z = logits.double() if logits is not None else h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    logq = torch.log_softmax(z / tau, dim=-1)
    valid = y != ignore
    safe = torch.where(valid, y, torch.zeros_like(y)).long()
    logp = logq.gather(-1, safe[..., None])[..., 0] * valid
    ent = -(logq.exp() * logq).sum(-1) * valid
    return logp, ent


def make(lead, hdim, vocab, dtype, bias, gen, ignore_frac=0.2):
    h = (torch.randn(*lead, hdim, generator=gen) * 1.5).to(dtype)
    w = (torch.randn(vocab, hdim, generator=gen) / hdim ** 0.25).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    y = torch.randint(0, vocab, lead, generator=gen)
    y[torch.rand(lead, generator=gen) < ignore_frac] = IGNORE
    return h, w, b, y


def close(actual, expected, dtype, name):
    tol = REL_TOL[dtype]
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    assert_close(actual, expected, atol=tol * max(scale, 1e-6), rtol=tol, name=name)


def run_and_grad(fn, leaves, outs_n, gen):
    """Call fn, backprop random fp32 upstream grads for every output, return (outs, grads)."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    ups = [torch.randn(o.shape, generator=gen) for o in outs]
    loss = sum((o.double() * u.double()).sum() for o, u in zip(outs, ups))
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    assert len(outs) == outs_n
    return outs, grads, ups


def check_linear(backend, lead, hdim, vocab, dtype, bias, entropy, tau, seed=0, hidden_view=None):
    gen = torch.Generator().manual_seed(seed)
    h, w, b, y = make(lead, hdim, vocab, dtype, bias, gen)
    if hidden_view is not None:
        h = hidden_view(h)
    leaves = [t.requires_grad_() for t in (h, w, b) if t is not None] + ([None] if b is None else [])
    with force_backend(backend):
        outs, grads, ups = run_and_grad(
            lambda: linear_logprobs(h, w, y, bias=b, temperature=tau, return_entropy=entropy),
            leaves, 1 + entropy, gen)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    ref = oracle(h64, w64, y, b64, tau)[: 1 + entropy]
    loss = sum((o * u.double()).sum() for o, u in zip(ref, ups))
    ref_grads = torch.autograd.grad(loss, [t for t in (h64, w64, b64) if t is not None])
    for name, o, r in zip(("logp", "entropy"), outs, ref):
        assert o.dtype == torch.float32 and o.shape == tuple(lead)
        close(o, r, torch.float32 if dtype == torch.float32 else torch.float16, name)
    for name, g, r, t in zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads, (h, w, b)):
        assert g.dtype == t.dtype and g.shape == t.shape
        close(g, r, dtype, name)


CASES = {  # lead, H, V, bias, entropy, temperature
    "odd-bias-entropy-tau": ((37,), 24, 131, True, True, 0.7),
    "batch-dims-entropy": ((3, 7), 24, 1000, False, True, 1.0),
    "v1000-bias-logp-only": ((21,), 40, 1000, True, False, 1.3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_linear_logprobs_matches_float64_oracle(backend, dtype, case):
    lead, hdim, vocab, bias, entropy, tau = CASES[case]
    check_linear(backend, lead, hdim, vocab, dtype, bias, entropy, tau)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_noncontiguous_hidden(backend):
    # hidden as a strided view (every other column of a wider tensor), and as a transposed view
    check_linear(backend, (29,), 24, 131, torch.float32, True, True, 0.9,
                 hidden_view=lambda h: torch.cat([h, h], dim=1)[:, ::2])
    check_linear(backend, (29,), 24, 131, torch.float32, False, False, 1.0,
                 hidden_view=lambda h: h.T.contiguous().T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_fp16_int32_strided_labels(backend):
    gen = torch.Generator().manual_seed(3)
    h, w, b, y = make((19,), 24, 131, torch.float16, True, gen)
    strided = torch.stack([y, y.flip(0)], dim=1).int()[:, 0]  # int32 view with stride 2
    assert strided.stride() == (2,)
    with force_backend(backend):
        logp = linear_logprobs(h, w, strided, bias=b)
        logp2 = logprobs_from_logits(h.float() @ w.float().T + b.float(), strided)
    close(logp, oracle(h, w, y, b)[0], torch.float16, "logp")
    close(logp2, oracle(h, w, y, b)[0], torch.float16, "logp from logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_mixed_dtypes(backend):
    """bf16 hidden with a float32 head (master weights): computed in float32, grads in each input's dtype."""
    gen = torch.Generator().manual_seed(7)
    h, w, b, y = make((21,), 24, 131, torch.float32, True, gen)
    h = h.bfloat16().requires_grad_()
    w.requires_grad_(), b.requires_grad_()
    with force_backend(backend):
        outs, grads, ups = run_and_grad(lambda: linear_logprobs(h, w, y, bias=b), [h, w, b], 1, gen)
    leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref = oracle(*leaves[:2], y, leaves[2])[0]
    ref_grads = torch.autograd.grad((ref * ups[0].double()).sum(), leaves)
    close(outs[0], ref, torch.float32, "logp")
    for name, g, r, t in zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads, (h, w, b)):
        assert g.dtype == t.dtype
        close(g, r, t.dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weight_gradients_accumulate(backend):
    """The LM head tied to the input embedding: weight.grad gets both contributions."""
    gen = torch.Generator().manual_seed(1)
    vocab, hdim, n = 131, 24, 23
    w = torch.randn(vocab, hdim, generator=gen, requires_grad=True)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    y = torch.randint(0, vocab, (n,), generator=gen)
    g = torch.randn(n, generator=gen)
    with force_backend(backend):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, w) * 2.0)
        (linear_logprobs(hidden, w, y) * g).sum().backward()
    w64 = w.detach().double().requires_grad_()
    hidden64 = torch.tanh(torch.nn.functional.embedding(ids, w64) * 2.0)
    (oracle(hidden64, w64, y)[0] * g.double()).sum().backward()
    close(w.grad, w64.grad, torch.float32, "tied d_weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("entropy,tau", [(True, 0.7), (False, 1.0)])
def test_logprobs_from_logits_matches_float64_oracle(backend, dtype, entropy, tau):
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 11, 1000, generator=gen) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, 1000, (3, 11), generator=gen)
    y[0, :4] = IGNORE
    with force_backend(backend):
        outs, (grad,), ups = run_and_grad(
            lambda: logprobs_from_logits(logits, y, temperature=tau, return_entropy=entropy),
            [logits], 1 + entropy, gen)
    l64 = logits.detach().double().requires_grad_()
    ref = oracle(None, None, y, tau=tau, logits=l64)[: 1 + entropy]
    (ref_grad,) = torch.autograd.grad(sum((o * u.double()).sum() for o, u in zip(ref, ups)), [l64])
    for name, o, r in zip(("logp", "entropy"), outs, ref):
        assert o.dtype == torch.float32 and o.shape == (3, 11)
        close(o, r, torch.float32 if dtype == torch.float32 else torch.float16, name)
    assert grad.dtype == dtype
    close(grad, ref_grad, dtype, "d_logits")
    assert float(grad[0, :4].abs().max()) == 0.0  # ignored rows get no gradient


@pytest.mark.parametrize("bias,entropy,tau", [(True, True, 0.7), (False, False, 1.0), (False, True, 1.0),
                                               (True, False, 1.3)])
def test_reference_tiling_gives_same_result(monkeypatch, bias, entropy, tau):
    """Force many tiles over tokens and over the vocabulary (online log-sum-exp): the result must not change."""
    monkeypatch.setattr(_tiles, "TILE_BYTES", {"cpu": 4 * 8 * 32, "cuda": 4 * 8 * 32})
    monkeypatch.setattr(_tiles, "TARGET_ROWS", {"cpu": 8, "cuda": 8})
    monkeypatch.setattr(_tiles, "COL_ALIGN", 16)
    assert _tiles.tile_shape(37, 131, 4) == (8, 32)
    check_linear("reference", (37,), 24, 131, torch.float32, bias, entropy, tau, seed=4)


def test_reference_row_chunking_gives_same_result(monkeypatch):
    """A budget below one aligned column block: tiles of whole rows, one token at a time."""
    monkeypatch.setattr(_tiles, "TILE_BYTES", {"cpu": 4 * 37 * 5, "cuda": 4 * 37 * 5})
    assert _tiles.tile_shape(37, 131, 4) == (1, 131)
    check_linear("reference", (37,), 24, 131, torch.float32, True, True, 0.7, seed=4)


def test_tile_shape_from_the_shapes():
    rows, cols = _tiles.tile_shape(8192, 151936, 4, "cpu")
    assert rows == _tiles.TARGET_ROWS["cpu"] and cols % _tiles.COL_ALIGN == 0
    assert rows * cols * 4 <= _tiles.TILE_BYTES["cpu"]
    # a small vocabulary fits whole: rows grow to fill the budget, capped at 1/MIN_TILES of the logits
    rows, cols = _tiles.tile_shape(1 << 18, 1000, 4, "cpu")
    assert cols == 1000 and rows == _tiles.TILE_BYTES["cpu"] // 4 // 1000
    assert _tiles.tile_shape(64, 1000, 8, "cpu") == (64, 1000)  # a small problem is one tile
    rows, cols = _tiles.tile_shape(2048, 32768, 4, "cpu")  # at most 1/MIN_TILES of the logits
    assert rows * cols <= 2048 * 32768 // _tiles.MIN_TILES
    assert _tiles.tile_shape(0, 7, 4) == (1, 7)
    assert _tiles.tile_shape(10, 7, 4, "cuda") == (10, 7)
    with pytest.raises(ValueError, match="vocab >= 1"):
        _tiles.tile_shape(10, 0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (0, 5)])
def test_empty_batch(backend, lead):
    w = torch.randn(131, 24, requires_grad=True)
    h = torch.randn(*lead, 24, requires_grad=True)
    y = torch.zeros(lead, dtype=torch.long)
    with force_backend(backend):
        logp, ent = linear_logprobs(h, w, y, return_entropy=True)
        assert logp.shape == lead and ent.shape == lead
        (logp.sum() + ent.sum()).backward()
        out = logprobs_from_logits(torch.randn(*lead, 131), y)
    assert out.shape == lead
    assert w.grad is not None and float(w.grad.abs().max()) == 0.0
    assert h.grad.shape == h.shape


def test_public_references_are_exact():
    gen = torch.Generator().manual_seed(5)
    h, w, b, y = make((13,), 24, 131, torch.float64, True, gen)
    lp, ent = linear_logprobs_reference(h, w, y, bias=b, temperature=0.5, return_entropy=True)
    ref = oracle(h, w, y, b, 0.5)
    assert lp.dtype == torch.float64
    assert_close(lp, ref[0], name="logp")
    assert_close(ent, ref[1], name="entropy")
    logits = h @ w.T
    lp2 = logprobs_from_logits_reference(logits, y, temperature=0.5)
    assert_close(lp2, oracle(None, None, y, tau=0.5, logits=logits)[0], name="logp from logits")


def _bad_cases():
    h, w, y = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    return [
        ("hidden", dict(hidden=h[:, :7]), ValueError, r"hidden's last dim must equal weight.shape\[1\] = 8"),
        ("labels-shape", dict(labels=y[:4]), ValueError, r"labels must have shape \(5,\)"),
        ("labels-float", dict(labels=y.float()), TypeError, r"labels must have dtype in \(int32, int64\)"),
        ("hidden-int", dict(hidden=h.long()), TypeError, r"hidden must have dtype"),
        ("weight-1d", dict(weight=w[0]), ValueError, r"weight must be 2-D"),
        ("weight-empty", dict(weight=w[:0]), ValueError, r"weight must have at least one row"),
        ("bias-shape", dict(bias=torch.randn(10)), ValueError, r"bias must have shape \(11,\)"),
        ("temperature-0", dict(temperature=0.0), ValueError, r"temperature must be > 0, got 0.0"),
        ("temperature-neg", dict(temperature=-1), ValueError, r"temperature must be > 0"),
        ("temperature-str", dict(temperature="1"), TypeError, r"temperature must be a number"),
        ("label-range", dict(labels=torch.tensor([0, 1, 11, 2, 3])), ValueError, r"labels must be in \[0, 11\).*got 11"),
        ("label-negative", dict(labels=torch.tensor([0, -1, 1, 2, 3])), ValueError, r"got -1"),
        ("hidden-list", dict(hidden=[[1.0] * 8] * 5), TypeError, r"hidden must be a torch.Tensor, got list"),
        ("device", dict(weight=w.to("meta")), ValueError, r"all tensors must be on one device.*weight on meta"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,override,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_linear_logprobs_bad_input(backend, name, override, exc, match):
    args = dict(hidden=torch.randn(5, 8), weight=torch.randn(11, 8), labels=torch.randint(0, 11, (5,)))
    override = dict(override)  # parametrize shares the dict between backends
    kwargs = {k: override.pop(k) for k in ("bias", "temperature") if k in override}
    args.update(override)
    with force_backend(backend), pytest.raises(exc, match=match):
        linear_logprobs(args["hidden"], args["weight"], args["labels"], **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_bad_input(backend):
    logits, y = torch.randn(5, 11), torch.randint(0, 11, (5,))
    with force_backend(backend):
        with pytest.raises(ValueError, match=r"labels must have shape \(5,\), got \(4,\)"):
            logprobs_from_logits(logits, y[:4])
        with pytest.raises(TypeError, match=r"logits must have dtype"):
            logprobs_from_logits(logits.long(), y)
        with pytest.raises(ValueError, match=r"temperature must be > 0"):
            logprobs_from_logits(logits, y, temperature=-0.5)
        with pytest.raises(TypeError, match=r"ignore_index must be an int"):
            logprobs_from_logits(logits, y, ignore_index=0.5)
        with pytest.raises(ValueError, match=r"labels must be in \[0, 11\)"):
            logprobs_from_logits(logits, y + 11)


@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable")
def test_triton_token_and_vocab_chunking(monkeypatch):
    """Tiny chunk budgets: several token chunks forward, several V chunks (last one partial) backward."""
    from fusedrl.kernels import _logprobs_triton as lt

    monkeypatch.setattr(lt, "PARTIALS_BYTES", 1)
    monkeypatch.setattr(lt, "_MIN_ROWS", 16)  # token chunks of 16 rows: 4 of them, the last partial
    monkeypatch.setattr(lt, "DZ_BYTES", 50 * 4 * 70)  # (N=50) x 70 fp32 columns -> VC = 2 * 32: 3 chunks
    check_linear("triton", (50,), 24, 131, torch.float32, True, True, 0.7, seed=6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_linear_logprobs_realistic_shape(dtype):
    """Autotuned kernels at a realistic, odd shape vs the float32 chunked reference on the GPU."""
    torch.manual_seed(0)
    n, hdim, vocab = 1031, 896, 32003
    h = torch.randn(n, hdim, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(vocab, hdim, device="cuda") / hdim ** 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda")
    y[::7] = IGNORE
    g = torch.randn(2, n, device="cuda")
    results = {}
    for backend in ("triton", "reference"):
        with force_backend(backend):
            lp, ent = linear_logprobs(h, w, y, temperature=0.8, return_entropy=True)
            grads = torch.autograd.grad((lp * g[0]).sum() + (ent * g[1]).sum(), [h, w])
        results[backend] = (lp, ent) + grads
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    for name, a, r in zip(("logp", "entropy", "d_hidden", "d_weight"), results["triton"], results["reference"]):
        err = (a.double() - r.double()).norm() / r.double().norm()
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.gpu
def test_gpu_256k_tokens_no_grid_limit():
    """262144 tokens in one call: every launch grid stays within CUDA's limits."""
    n, hdim, vocab = 262144, 64, 1000
    h = torch.randn(n, hdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, hdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, vocab, (n,), device="cuda")
    lp = linear_logprobs(h, w, y)
    lp.sum().backward()
    logits = (h.detach().float() @ w.detach().float().T)
    lp2 = logprobs_from_logits(logits, y)
    assert torch.isfinite(lp).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert (lp - lp2).abs().max() < 2e-2


def test_bench_smoke(tmp_path, capsys):
    """The bench runs end to end at tiny shapes on CPU: providers checked, rows written."""
    import json

    from fusedrl.bench import bench_logprobs

    code = bench_logprobs.main(["--smoke", "--cases", "LP-0.5B", "--modes", "full", "--results-dir", str(tmp_path)])
    assert code == 0
    rows = json.load(open(next(tmp_path.glob("logprobs-*.json"))))["rows"]
    ours = [r for r in rows if r["provider"] == "fusedrl"]
    assert ours and all(r["status"] == "ok" and r["max_rel_err"] < 1e-5 for r in ours)
    assert {r["provider"] for r in rows} >= {"eager bf16 logits", "eager fp32 logits", "row-looped (TRL)",
                                              "liger FLCE (none)", "cce (default filter)", "cce exact"}
    assert "x the matmul roofline" in capsys.readouterr().out


@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable")
def test_autotune_prune_drops_configs_that_overflow_shared_memory():
    import triton

    from fusedrl.kernels._logprobs_triton import smem_prune

    configs = [triton.Config(dict(BLOCK_N=256, BLOCK_H=64), num_stages=3),  # bf16 144 KiB, fp32 288 KiB
               triton.Config(dict(BLOCK_N=64, BLOCK_H=64), num_stages=4)]  # bf16 64 KiB, fp32 128 KiB
    prune = smem_prune("h_ptr", "BLOCK_N", "BLOCK_V", "BLOCK_H")
    assert prune(configs, {"h_ptr": torch.empty(0, dtype=torch.bfloat16)}, BLOCK_V=128) == configs
    assert prune(configs, {"h_ptr": torch.empty(0, dtype=torch.float32)}, BLOCK_V=128) == configs[1:]
    assert prune(configs[:1], {"h_ptr": torch.empty(0, dtype=torch.float32)}, BLOCK_V=128) == configs[:1]


@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable")
def test_autotune_prune_follows_the_device_shared_memory(monkeypatch):
    """On a chip with less shared memory per block (A100: 163 KiB opt-in) the pruner keeps less."""
    import types

    import triton

    from fusedrl.kernels import _logprobs_triton as T

    for optin, budget in ((232448, 200 << 10), (166912, 166912 - (27 << 10))):
        props = types.SimpleNamespace(shared_memory_per_block_optin=optin)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index, p=props: p)
        T.smem_budget.cache_clear()
        assert T.smem_budget(0) == budget
    configs = [triton.Config(dict(BLOCK_N=256, BLOCK_H=64), num_stages=3),  # bf16 144 KiB
               triton.Config(dict(BLOCK_N=64, BLOCK_H=64), num_stages=4)]  # bf16 64 KiB
    fake_a100_tensor = types.SimpleNamespace(element_size=lambda: 2, is_cuda=True, device=torch.device("cuda", 0))
    prune = T.smem_prune("h_ptr", "BLOCK_N", "BLOCK_V", "BLOCK_H")
    assert prune(configs, {"h_ptr": fake_a100_tensor}, BLOCK_V=128) == configs[1:]
    T.smem_budget.cache_clear()
