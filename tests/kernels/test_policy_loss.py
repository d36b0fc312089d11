"""policy_loss: hand values, float64 oracle (a per-sequence loop), Triton interpreter vs reference,
gradient accumulation, padded vs packed, empty sequences, bad input."""
import math

import pytest
import torch

import fusedrl.kernels._policy_loss_triton as plt
from fusedrl.kernels import force_backend, policy_loss
from tests.conftest import assert_close

ALGOS = ["ppo", "gspo", "cispo", "sapo", "reinforce"]
MODES = ["token_mean", "seq_mean", "seq_mean_fixed_len"]
LOG15, LOG05 = math.log(1.5), math.log(0.5)


def call(backend, *args, **kwargs):
    """policy_loss on one backend. Triton runs on CUDA tensors when a GPU exists, else on CPU
    tensors under the interpreter; leaves stay on the CPU (gradients flow back through .to)."""
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    move = lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
    with force_backend(backend):
        return policy_loss(*map(move, args), **{k: move(v) for k, v in kwargs.items()})


@pytest.fixture
def small_block(monkeypatch):
    """Blocks of 4 tokens so the kernels' per-sequence loops take several steps."""
    monkeypatch.setattr(plt, "BLOCK", 4)


def one_seq(algo, adv=1.0, **kw):
    # one sequence, old = 0, ratios [1.5, 0.5]
    logp = torch.tensor([LOG15, LOG05], dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(2, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64),
                                cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), algo=algo, **kw)
    return loss, metrics, logp


def test_ppo_hand():
    # A = 1: r 1.5 -> min(1.5, clip 1.2) = 1.2; r 0.5 -> min(0.5, 0.8) = 0.5; mean of -[1.2, 0.5] = -0.85
    loss, m, logp = one_seq("ppo")
    assert_close(loss, torch.tensor(-0.85, dtype=torch.float64))
    assert_close(m["clip_frac"], torch.tensor(0.5))  # token 0: A > 0 and r > 1.2
    assert_close(m["ratio_mean"], torch.tensor(1.0))
    # gradient: token 0 clipped -> 0; token 1: -r A / 2 = -0.25
    (g,) = torch.autograd.grad(loss, logp)
    assert_close(g, torch.tensor([0.0, -0.25], dtype=torch.float64))
    # A = -1: -min(-1.5, -1.2) = 1.5; -min(-0.5, -0.8) = 0.8; mean 1.15
    assert_close(one_seq("ppo", adv=-1.0)[0], torch.tensor(1.15, dtype=torch.float64))
    # DAPO clip-higher eps_high 0.28, A = 1: -[1.28, 0.5] -> -0.89
    assert_close(one_seq("ppo", eps_high=0.28)[0], torch.tensor(-0.89, dtype=torch.float64))
    # dual clip c = 1.2 with A = -1: token 0 loss 1.5 capped at 1.2; token 1 stays 0.8 -> mean 1.0
    assert_close(one_seq("grpo", adv=-1.0, dual_clip=1.2)[0], torch.tensor(1.0, dtype=torch.float64))


def test_other_algos_hand():
    # GSPO: s = exp(mean(log 1.5, log 0.5)) = sqrt(0.75); inside [0.8, 1.2] -> every token -sqrt(0.75)
    assert_close(one_seq("gspo")[0], torch.tensor(-math.sqrt(0.75), dtype=torch.float64))
    # CISPO eps_high 4: r 1.5 kept, r 0.5 -> 0.8: mean of [-1.5 log 1.5, -0.8 log 0.5]
    loss, _, logp = one_seq("cispo", eps_high=4.0)
    assert_close(loss, torch.tensor((-1.5 * LOG15 - 0.8 * LOG05) / 2, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss, logp)  # stop-gradient weight: -[1.5, 0.8] / 2
    assert_close(g, torch.tensor([-0.75, -0.4], dtype=torch.float64))
    # SAPO tau 1: -4 [sigmoid(0.5) + sigmoid(-0.5)] / 2 = -2
    assert_close(one_seq("sapo")[0], torch.tensor(-2.0, dtype=torch.float64))
    # SAPO A = -1 uses tau_neg 1.05: 4 / 1.05 [sigmoid(0.525) + sigmoid(-0.525)] / 2 = 2 / 1.05
    assert_close(one_seq("sapo", adv=-1.0)[0], torch.tensor(2 / 1.05, dtype=torch.float64))
    # REINFORCE: -(log 1.5 + log 0.5) / 2
    assert_close(one_seq("reinforce")[0], torch.tensor(-(LOG15 + LOG05) / 2, dtype=torch.float64))


def test_kl_entropy_is_weight_hand():
    # r = 1 (old = logp), A = 0 -> pg 0; delta vs ref 0.5 -> k3 = exp(-0.5) - 0.5; entropy 2, c_ent 0.01;
    # sampler: old - sampler = log 3 -> w = min(3, 2) = 2, on the pg term only (0 here): l = 0.1 k3 - 0.02
    logp = torch.tensor([-1.0], dtype=torch.float64)
    loss, m = policy_loss(logp, logp, torch.zeros(1, dtype=torch.float64), cu_seqlens=torch.tensor([0, 1]).int(),
                          advantages_layout="sequence", ref_logp=logp - 0.5, beta=0.1,
                          entropy=torch.tensor([2.0], dtype=torch.float64),
                          c_ent=0.01, sampler_logp=logp - math.log(3))
    k3 = math.exp(-0.5) - 0.5
    assert_close(loss, torch.tensor(0.1 * k3 - 0.02, dtype=torch.float64))
    assert_close(m["kl_ref"], torch.tensor(k3, dtype=torch.float32))
    assert_close(m["entropy"], torch.tensor(2.0))
    assert_close(m["is_weight_mean"], torch.tensor(2.0))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_aggregation_hand_and_empty_sequence(backend):
    # REINFORCE with logp = -1: l_t = A_i. Seq 0: 1 token, A 1; seq 1: 3 tokens, A 2; seq 2: all masked.
    logp = torch.full((7,), -1.0, requires_grad=True)
    logp.data[4:] = float("nan")  # garbage in masked positions must not leak
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0])
    cu = torch.tensor([0, 1, 4, 7], dtype=torch.int32)
    adv = torch.tensor([1.0, 2.0, 5.0])
    expected = {"token_mean": (1 + 6) / 4, "seq_mean": (1 / 1 + 6 / 3 + 0) / 3, "seq_mean_fixed_len": 7 / 4 / 3}
    for mode, value in expected.items():
        loss, m = call(backend, logp, None, adv, mask, cu_seqlens=cu, algo="reinforce", aggregation=mode,
                       max_len=4)
        assert_close(loss, torch.tensor(value), name=mode)
        (g,) = torch.autograd.grad(loss, logp)
        assert bool(torch.isfinite(g).all()) and bool((g[4:] == 0).all())
        assert_close(m["response_len"], torch.tensor(4 / 3))


def naive_loss(logp, old, adv, mask, lengths, algo, mode, *, max_len=7, eps_low=0.2, eps_high=0.28, dual=None,
               ref=None, beta=0.0, kind="k3", ent=None, c_ent=0.0, sampler=None):
    """Float64 oracle straight from docs/objectives.md: a loop over sequences, per-token advantages."""
    seq_terms, n_total, start = [], 0.0, 0
    for n in lengths:
        sl = slice(start, start + n)
        start += n
        m = mask[sl].bool()
        lp, od, a = logp[sl][m], old[sl][m], adv[sl][m]
        k = lp.numel()
        n_total += k
        r = torch.exp(lp - od)
        if algo == "gspo":
            r = torch.exp((lp - od).mean()).expand(k) if k else r
        if algo in ("ppo", "gspo"):
            lt = -torch.min(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
            if dual is not None:
                lt = torch.where(a < 0, torch.min(lt, -dual * a), lt)
        elif algo == "cispo":
            lt = -torch.clamp(r, 1 - eps_low, 1 + eps_high).detach() * a * lp
        elif algo == "sapo":
            tau = torch.where(a >= 0, a.new_tensor(1.0), a.new_tensor(1.05))
            lt = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
        else:
            lt = -a * lp
        if sampler is not None:  # truncated IS on the policy-gradient term only (verl, TRL, OpenRLHF)
            lt = lt * torch.clamp(torch.exp(od - sampler[sl][m]), max=2.0)
        if ref is not None:
            d = lp - ref[sl][m]
            kl = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) - 1 + d}[kind]
            lt = lt + beta * kl
        if ent is not None:
            lt = lt - c_ent * ent[sl][m]
        total = lt.sum()
        seq_terms.append((total, k))
    if mode == "token_mean":
        return sum(t for t, _ in seq_terms) / n_total
    if mode == "seq_mean":
        return sum(t / max(k, 1) for t, k in seq_terms) / len(lengths)
    return sum(t for t, _ in seq_terms) / max_len / len(lengths)


def make_batch(lengths, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    logp = -torch.rand(n, generator=g, dtype=dtype) * 2 - 0.05
    old = logp + 0.3 * torch.randn(n, generator=g, dtype=dtype)
    ref = logp + 0.3 * torch.randn(n, generator=g, dtype=dtype)
    sampler = old + 0.5 * torch.randn(n, generator=g, dtype=dtype)
    ent = torch.rand(n, generator=g, dtype=dtype) * 3
    adv_seq = torch.randn(len(lengths), generator=g, dtype=dtype)
    mask = (torch.rand(n, generator=g) > 0.2).long()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return dict(logp=logp, old=old, ref=ref, sampler=sampler, ent=ent, adv_seq=adv_seq, mask=mask, cu=cu)


LENGTHS = [3, 0, 6, 1, 5]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_float64_oracle(algo, mode):
    b = make_batch(LENGTHS)
    adv_tok = b["adv_seq"].repeat_interleave(torch.tensor(LENGTHS))
    kw = dict(ref=b["ref"], beta=0.05, ent=b["ent"], c_ent=0.01, sampler=b["sampler"],
              dual=3.0 if algo in ("ppo", "gspo") else None)
    up = 0.7  # a non-unit upstream gradient
    lp1 = b["logp"].clone().requires_grad_()
    en1 = b["ent"].clone().requires_grad_()
    expected = naive_loss(lp1, b["old"], adv_tok, b["mask"], LENGTHS, algo, mode, **{**kw, "ent": en1})
    g_exp = torch.autograd.grad(expected * up, [lp1, en1])
    lp2 = b["logp"].clone().requires_grad_()
    en2 = b["ent"].clone().requires_grad_()
    with force_backend("reference"):
        loss, _ = policy_loss(lp2, b["old"], b["adv_seq"], b["mask"], cu_seqlens=b["cu"], algo=algo, eps_high=0.28,
                              dual_clip=kw["dual"], ref_logp=b["ref"], beta=0.05, entropy=en2, c_ent=0.01,
                              sampler_logp=b["sampler"], aggregation=mode, max_len=7)
    g = torch.autograd.grad(loss * up, [lp2, en2])
    assert_close(loss, expected, name="loss")
    assert_close(g[0], g_exp[0], name="dlogp")
    assert_close(g[1], g_exp[1], name="dentropy")


def run_both(b, up, **kw):
    """(loss, grads, metrics) for the reference and the Triton path on float32 inputs."""
    out = []
    for backend in ("reference", "triton"):
        lp = b["logp"].float().clone().requires_grad_()
        en = b["ent"].float().clone().requires_grad_()
        loss, m = call(backend, lp, b["old"].float(), b["adv_seq"].float(), b["mask"], cu_seqlens=b["cu"],
                       entropy=en, **kw)
        out.append((loss, torch.autograd.grad(loss * up, [lp, en]), m))
    return out


@pytest.mark.parametrize("algo", ALGOS)
def test_triton_matches_reference(algo, small_block):
    b = make_batch(LENGTHS, seed=1, dtype=torch.float32)
    for mode, kind in zip(MODES, ["k3", "k3+", "k2"]):
        kw = dict(algo=algo, aggregation=mode, max_len=7, ref_logp=b["ref"].float(), beta=0.05, kl_kind=kind,
                  kl_clamp=0.4 if kind == "k2" else None, c_ent=0.01, sampler_logp=b["sampler"].float(),
                  eps_high=0.28, dual_clip=3.0 if algo in ("ppo", "gspo") else None)
        (l0, g0, m0), (l1, g1, m1) = run_both(b, 1.3, **kw)
        assert_close(l1, l0, name=f"{mode} loss")
        assert_close(g1[0], g0[0], name=f"{mode} dlogp")
        assert_close(g1[1], g0[1], name=f"{mode} dentropy")
        for key in m0:
            assert_close(m1[key], m0[key], name=key)


def test_triton_without_optional_inputs(small_block):
    b = make_batch([5, 2, 9], seed=2, dtype=torch.float32)
    for kind in ("k1", "k3"):
        outs = []
        for backend in ("reference", "triton"):
            lp = b["logp"].clone().requires_grad_()
            loss, m = call(backend, lp, b["old"], b["adv_seq"], cu_seqlens=b["cu"], ref_logp=b["ref"], kl_kind=kind)
            outs.append((loss, torch.autograd.grad(loss, lp)[0], m))
        assert_close(outs[1][0], outs[0][0])
        assert_close(outs[1][1], outs[0][1])
        assert set(outs[1][2]) == {"clip_frac", "ratio_mean", "approx_kl", "ppo_kl", "response_len", "kl_ref"}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_grad_accumulation_equals_full_batch(backend, mode):
    lengths = [4, 2, 5, 3, 1, 6, 2, 3]
    b = make_batch(lengths, seed=3, dtype=torch.float32)
    kw = dict(algo="ppo", aggregation=mode, max_len=6, ref_logp=b["ref"], beta=0.04)
    lp = b["logp"].clone().requires_grad_()
    full, _ = call(backend, lp, b["old"], b["adv_seq"], b["mask"], cu_seqlens=b["cu"], **kw)
    (g_full,) = torch.autograd.grad(full, lp)
    n_tok, cu = int(b["mask"].sum()), b["cu"].long()
    lp_acc = b["logp"].clone().requires_grad_()
    total = 0.0
    for i in range(0, 8, 2):  # 4 micro-batches of 2 sequences
        s, e = int(cu[i]), int(cu[i + 2])
        sub = lambda t: t[s:e]  # noqa: E731
        loss, _ = call(backend, sub(lp_acc), sub(b["old"]), b["adv_seq"][i:i + 2], sub(b["mask"]),
                       cu_seqlens=(cu[i:i + 3] - s).int(), algo="ppo", aggregation=mode, max_len=6,
                       ref_logp=sub(b["ref"]), beta=0.04, num_tokens=n_tok, num_seqs=8)
        loss.backward()
        total = total + loss.detach()
    assert_close(total, full.detach())
    assert_close(lp_acc.grad, g_full)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_padded_equals_packed(backend):
    lengths = [3, 5, 1]
    b = make_batch(lengths, seed=4, dtype=torch.float32)
    pad = torch.zeros(3, 5, dtype=torch.long)
    keep = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]

    def padded(t, fill=0.0):
        out = torch.full((3, 5), fill, dtype=t.dtype)
        out[keep] = t
        return out

    mask_pad = padded(b["mask"], 0) * keep
    adv_tok = b["adv_seq"].repeat_interleave(torch.tensor(lengths))
    for mode in MODES:
        kw = dict(algo="gspo", aggregation=mode, max_len=5, ref_logp=None)
        lp_p = b["logp"].clone().requires_grad_()
        lp_d = padded(b["logp"]).requires_grad_()
        packed, _ = call(backend, lp_p, b["old"], adv_tok, b["mask"], cu_seqlens=b["cu"], **kw)
        padded_loss, _ = call(backend, lp_d, padded(b["old"]), b["adv_seq"], mask_pad + pad, **kw)
        assert_close(padded_loss, packed, name=mode)
        assert_close(torch.autograd.grad(padded_loss, lp_d)[0][keep], torch.autograd.grad(packed, lp_p)[0])


def test_bf16_inputs_return_float32_loss_and_bf16_grad():
    b = make_batch([4, 3], seed=5, dtype=torch.float32)
    lp = b["logp"].to(torch.bfloat16).requires_grad_()
    loss, _ = policy_loss(lp, b["old"].bfloat16(), b["adv_seq"], cu_seqlens=b["cu"])
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == torch.bfloat16


def test_bad_input():
    x, cu = torch.zeros(5), torch.tensor([0, 2, 5], dtype=torch.int32)
    adv = torch.zeros(2)
    with pytest.raises(ValueError, match="algo must be one of"):
        policy_loss(x, x, adv, cu_seqlens=cu, algo="trpo")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        policy_loss(x, x, adv, cu_seqlens=cu, aggregation="sum")
    with pytest.raises(ValueError, match="needs max_len"):
        policy_loss(x, x, adv, cu_seqlens=cu, aggregation="seq_mean_fixed_len")
    with pytest.raises(ValueError, match=r"advantages must be per token \(5,\) or per sequence \(2,\), got \(3,\)"):
        policy_loss(x, x, torch.zeros(3), cu_seqlens=cu)
    with pytest.raises(ValueError, match="old_logp must have the per-token shape"):
        policy_loss(x, torch.zeros(4), adv, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens\\[-1\\] must equal the number of tokens 5"):
        policy_loss(x, x, adv, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must have dtype in \\(int32\\)"):
        policy_loss(x, x, adv, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="logp must be \\(B, T\\) padded"):
        policy_loss(x, x, adv)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(x, x, adv, cu_seqlens=cu, beta=0.1)
    with pytest.raises(ValueError, match="needs entropy"):
        policy_loss(x, x, adv, cu_seqlens=cu, c_ent=0.1)
    with pytest.raises(ValueError, match="kl_kind must be one of"):
        policy_loss(x, x, adv, cu_seqlens=cu, kl_kind="k5")
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(x, x, adv, cu_seqlens=cu, dual_clip=0.5)
    with pytest.raises(ValueError, match="dual_clip applies to algo ppo/grpo/gspo/gspo_token/clip_cov only"):
        policy_loss(x, x, adv, cu_seqlens=cu, algo="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="num_tokens must be > 0"):
        policy_loss(x, x, adv, cu_seqlens=cu, num_tokens=0)
    with pytest.raises(ValueError, match="mask must have the per-token shape"):
        policy_loss(x, x, adv, torch.ones(4), cu_seqlens=cu)


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ALGOS)
def test_gpu_realistic_shape(algo):
    """Compiled kernels (default BLOCK) on 37 bf16 sequences of up to 3000 tokens vs the reference."""
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 3000, (37,), generator=g).tolist()
    b = make_batch(lengths, seed=8, dtype=torch.float32)
    b["logp"] = b["logp"].bfloat16().float()
    kw = dict(algo=algo, aggregation="seq_mean", ref_logp=b["ref"].cuda(), beta=0.04, c_ent=0.01,
              sampler_logp=b["sampler"].cuda())
    old, adv, mask, cu = b["old"].float().cuda(), b["adv_seq"].float().cuda(), b["mask"].cuda(), b["cu"].cuda()
    out = []
    for backend in ("reference", "triton"):
        lp = b["logp"].cuda().bfloat16().requires_grad_()
        en = b["ent"].float().cuda().requires_grad_()
        torch.cuda.synchronize()
        # the Triton path must not synchronise with the host (forward, metrics, backward)
        torch.cuda.set_sync_debug_mode("error" if backend == "triton" else "default")
        try:
            with force_backend(backend):
                loss, m = policy_loss(lp, old, adv, mask, cu_seqlens=cu, entropy=en, **kw)
            grads = torch.autograd.grad(loss, [lp, en])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out.append((loss, grads, m))
    (l0, g0, m0), (l1, g1, m1) = out
    assert_close(l1, l0, atol=1e-5, rtol=1e-4)
    assert_close(g1[0].float(), g0[0].float(), atol=1e-6, rtol=2e-2)  # bf16 gradients
    assert_close(g1[1], g0[1], atol=1e-7, rtol=1e-4)
    for key in m0:
        assert_close(m1[key], m0[key], atol=1e-5, rtol=1e-4, name=key)


@pytest.mark.parametrize("algo", ["grpo", "ppo", "gspo", "cispo", "sapo", "reinforce"])
def test_old_logp_none_is_on_policy(algo):
    """old_logp=None means old = sg(logp): same loss and gradient as passing logp.detach()."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 3, 4, 9], dtype=torch.int32)
    base = torch.randn(9, dtype=torch.float64)
    adv = torch.randn(4, dtype=torch.float64)
    ref = base + 0.1 * torch.randn(9, dtype=torch.float64)
    grads, losses = [], []
    for old in (None, "detached"):
        logp = base.clone().requires_grad_(True)
        loss, _ = policy_loss(logp, None if old is None else logp.detach(), adv, cu_seqlens=cu, algo=algo,
                              ref_logp=ref, beta=0.04)
        loss.backward(torch.tensor(1.7, dtype=torch.float64))
        losses.append(loss.detach())
        grads.append(logp.grad)
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layout_regression_tokens_equal_sequences(backend):
    """Issue 13: 2 tokens in 2 sequences (one empty): per-sequence advantages must not be read per token."""
    cu = torch.tensor([0, 0, 2], dtype=torch.int32)
    dtype = torch.float64 if backend == "reference" else torch.float32
    logp = torch.tensor([-1.0, -2.0], dtype=dtype, requires_grad=True)
    adv = torch.tensor([5.0, 1.0], dtype=dtype)
    loss, _ = call(backend, logp, None, adv, cu_seqlens=cu, algo="reinforce", advantages_layout="sequence")
    assert_close(loss, torch.tensor(1.5, dtype=dtype))  # seq 1's A = 1 on both tokens: -(1 * -1 + 1 * -2) / 2
    assert_close(torch.autograd.grad(loss, logp)[0], torch.tensor([-0.5, -0.5], dtype=dtype))
    loss, _ = call(backend, logp, None, adv, cu_seqlens=cu, algo="reinforce", advantages_layout="token")
    assert_close(loss, torch.tensor(3.5, dtype=dtype))  # -(5 * -1 + 1 * -2) / 2
    with pytest.raises(ValueError, match="ambiguous.*advantages_layout='token' or advantages_layout='sequence'"):
        policy_loss(logp, None, adv, cu_seqlens=cu, algo="reinforce")
    with pytest.raises(ValueError, match=r"advantages must be per sequence \(2,\), got \(3,\)"):
        policy_loss(logp, None, torch.zeros(3, dtype=dtype), cu_seqlens=cu, advantages_layout="sequence")
    with pytest.raises(ValueError, match="advantages_layout must be None, 'token' or 'sequence'"):
        policy_loss(logp, None, adv, cu_seqlens=cu, advantages_layout="seq")
    # unambiguous shapes keep working without the argument (padded (B, T) vs (B,); packed total != B)
    pad, _ = policy_loss(torch.tensor([[-1.0, -2.0]], dtype=dtype), None, torch.tensor([1.0], dtype=dtype),
                         algo="reinforce")
    assert_close(pad, torch.tensor(1.5, dtype=dtype))
