"""policy_loss options added for parity with verl / TRL / OpenRLHF: hand cases, and a float64 oracle
written here (a per-sequence loop, independent of the implementation) on packed sequences with an
empty and a one-token sequence, for the reference (float64) and the Triton kernel (interpreter)."""
import importlib
import math

import pytest
import torch

import fusedrl.kernels._policy_loss_triton as plt
from fusedrl.kernels import DUAL_CLIP_DEFAULT, force_backend, policy_loss
from tests.conftest import assert_close

LOG15, LOG05 = math.log(1.5), math.log(0.5)
LENGTHS = [3, 0, 6, 1, 5]
F64 = torch.float64


def call(backend, *args, **kwargs):
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    move = lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
    with force_backend(backend):
        return policy_loss(*map(move, args), **{k: move(v) for k, v in kwargs.items()})


@pytest.fixture
def small_block(monkeypatch):
    monkeypatch.setattr(plt, "BLOCK", 4)


def t(*v):
    return torch.tensor(v, dtype=F64)


# ----------------------------------------------------------------------------- hand cases

def test_tis_multiplies_the_pg_term_only_by_default():
    # one token: logp = old = -1, A = 1 (reinforce pg = 1), ref = logp - 0.5 (k1 = 0.5), w = min(3, 2) = 2
    cu = torch.tensor([0, 1], dtype=torch.int32)
    kw = dict(cu_seqlens=cu, advantages_layout="sequence", algo="reinforce", ref_logp=t(-1.5), beta=0.1,
              kl_kind="k1", sampler_logp=t(-1.0 - math.log(3)))
    for scope, value, grad in (("pg", 2 * 1 + 0.1 * 0.5, -2 + 0.1), ("loss", 2 * (1 + 0.05), 2 * (-1 + 0.1))):
        logp = t(-1.0).requires_grad_()
        loss, m = policy_loss(logp, t(-1.0), t(1.0), is_scope=scope, **kw)
        assert_close(loss, t(value)[0], name=scope)
        assert_close(torch.autograd.grad(loss, logp)[0], t(grad), name=scope)
        assert_close(m["is_weight_mean"], torch.tensor(2.0))


def test_is_levels_modes_and_lower_bound_hand():
    # two tokens, old - sampler = [log 4, log 0.25]: token weights [4, 0.25], product 1, geometric 1
    cu = torch.tensor([0, 2], dtype=torch.int32)
    old = t(-1.0, -2.0)
    sampler = old - t(math.log(4), math.log(0.25))
    adv = t(1.0)

    def pg_weighted(**kw):  # reinforce with logp = -1, -1: pg = [1, 1]; token mean of w * pg = mean(w)
        loss, m = policy_loss(t(-1.0, -1.0), old, adv, cu_seqlens=cu, algo="reinforce", sampler_logp=sampler, **kw)
        return float(loss), m

    assert pg_weighted()[0] == pytest.approx((2 + 0.25) / 2)  # truncate at is_cap 2, no lower bound
    assert pg_weighted(is_low=0.5)[0] == pytest.approx((2 + 0.5) / 2)
    value, m = pg_weighted(is_mode="mask", is_low=0.5)  # both tokens leave [0.5, 2]: dropped
    assert value == pytest.approx(0.0) and float(m["is_dropped_frac"]) == pytest.approx(1.0)
    assert pg_weighted(is_mode="mask", is_cap=5.0)[0] == pytest.approx((4 + 0.25) / 2)
    assert pg_weighted(is_level="sequence")[0] == pytest.approx(1.0)  # 4 * 0.25
    assert pg_weighted(is_level="geometric", is_cap=0.9)[0] == pytest.approx(0.9)  # sqrt(4 * 0.25) = 1 > 0.9


def test_gspo_token_hand():
    # old 0, ratios [1.5, 0.5], per-token A [1, 2]: s = sqrt(0.75) in [0.8, 1.2]
    s = math.sqrt(0.75)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    for algo, grad in (("gspo_token", [-s / 2, -s]), ("gspo", [-3 * s / 4, -3 * s / 4])):
        logp = t(LOG15, LOG05).requires_grad_()
        loss, m = policy_loss(logp, t(0.0, 0.0), t(1.0, 2.0), cu_seqlens=cu, algo=algo, advantages_layout="token")
        assert_close(loss, t(-3 * s / 2)[0], name=algo)
        assert_close(torch.autograd.grad(loss, logp)[0], t(*grad), name=algo)
        assert_close(m["ratio_mean"], torch.tensor(s, dtype=torch.float32))


def test_gmpo_hand():
    # d = [log 1.5, log 0.5], A = 1, log-ratio clip [-0.4, 0.4]: min(d, clip d) = [0.4, log 0.5]
    g = math.exp((0.4 + LOG05) / 2)
    logp = t(LOG15, LOG05).requires_grad_()
    loss, m = policy_loss(logp, t(0.0, 0.0), t(1.0), cu_seqlens=torch.tensor([0, 2], dtype=torch.int32),
                          algo="gmpo", eps_low=0.4, eps_high=0.4, aggregation="seq_mean")
    assert_close(loss, t(-g)[0])
    # token 0's clip is active: no gradient; token 1: d(-g)/dlogp_1 = -g / 2
    assert_close(torch.autograd.grad(loss, logp)[0], t(0.0, -g / 2))
    assert_close(m["clip_frac"], torch.tensor(0.5))


def test_dual_clip_true_is_verl_default_and_metric_names():
    b = make_batch(seed=11)
    a, _ = policy_loss(b["logp"], b["old"], -b["adv_seq"].abs() * 4, cu_seqlens=b["cu"], dual_clip=True)
    c, m = policy_loss(b["logp"], b["old"], -b["adv_seq"].abs() * 4, cu_seqlens=b["cu"], dual_clip=3.0)
    assert DUAL_CLIP_DEFAULT == 3.0 and torch.equal(a, c)
    # approx_kl: verl's ppo_kl = token mean of old - logp; approx_kl_k3 the k3 estimate of the same
    d = b["logp"] - b["old"]  # no mask: every token counts
    assert_close(m["approx_kl"], (-d).mean().float())
    assert_close(m["approx_kl_k3"], (torch.expm1(-d) + d).mean().float())


def test_entropy_and_kl_aggregations_hand():
    # reinforce, logp = -1 everywhere; seq 0: 1 token (A 1, H 3, k1 0.5), seq 1: 3 tokens (A 2, H 1, k1 0.1)
    cu = torch.tensor([0, 1, 4], dtype=torch.int32)
    logp = torch.full((4,), -1.0, dtype=F64)
    ref = logp - t(0.5, 0.1, 0.1, 0.1)
    ent = t(3.0, 1.0, 1.0, 1.0)
    loss, _ = policy_loss(logp, None, t(1.0, 2.0), cu_seqlens=cu, algo="reinforce", aggregation="seq_mean",
                          ref_logp=ref, beta=0.5, kl_kind="k1", kl_aggregation="seq_sum", entropy=ent, c_ent=0.1,
                          entropy_aggregation="token_mean")
    pg = (1 / 1 + 6 / 3) / 2  # seq_mean of pg sums [1, 6]
    kl = (0.5 + 0.3) / 2  # seq_sum: KL sums [0.5, 0.3] over B = 2
    h = (3 + 3) / 4  # token mean of the entropies
    assert_close(loss, t(pg + 0.5 * kl - 0.1 * h)[0])


def test_k3_precise_near_zero_on_triton(small_block):
    """k3 in the kernel keeps its digits near 0, where exp(-d) - 1 + d in float32 is noise."""
    for d in (1e-4, -3e-4, 2e-3, -0.099, 0.101, 0.7):
        logp = torch.tensor([-2.0])
        _, m = call("triton", logp, logp, torch.zeros(1), cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
                    ref_logp=logp - d, advantages_layout="token")
        d32 = float(torch.tensor(-2.0) - (logp - d))  # the float32 delta the kernel sees
        exact = sum((-d32) ** k / math.factorial(k) for k in range(2, 30))
        assert_close(m["kl_ref"], torch.tensor(exact, dtype=torch.float32), atol=0, rtol=2e-6, name=str(d))


# ----------------------------------------------------------------------------- the float64 oracle

def kl_oracle(d, kind, clamp, vclamp):
    if clamp is not None:
        d = d.clamp(-clamp, clamp)
    k2 = d * d / 2
    k3 = torch.exp(-d) - 1 + d
    kl = {"k1": d, "k2": k2, "k3": k3, "k3+": k2 + (k3 - k2).detach(), "abs": d.abs(),
          "k1+": k2 + (d - k2).detach()}[kind]
    return kl if vclamp is None else kl.clamp(-vclamp, vclamp)


def seq_pg(lp, od, a, sel, o):
    """Per-token pg of one sequence (k tokens), straight from the papers / verl's core_algos."""
    lo, hi = 1 - o["eps_low"], 1 + o["eps_high"]
    d = lp - od
    algo = o["algo"]
    if algo == "gmpo":  # verl compute_policy_loss_geo_mean, one row
        sgn = torch.sign(a)
        clamped = torch.clamp(d, -o["eps_low"], o["eps_high"])
        kept = sgn * torch.min(sgn * d, sgn * clamped)
        return -a * torch.exp(kept.sum() / len(lp))
    r = torch.exp(d)
    if algo in ("gspo", "gspo_token"):
        s = torch.exp(d.mean())
        r = s.expand(len(lp)) if algo == "gspo" else s.detach() * torch.exp(lp - lp.detach())
    if algo in ("ppo", "gspo", "gspo_token", "clip_cov"):
        lt = -torch.min(r * a, torch.clamp(r, lo, hi) * a)
        if o.get("dual") is not None:
            lt = torch.where(a < 0, torch.min(lt, -o["dual"] * a), lt)
        return lt * (1 - sel) if algo == "clip_cov" else lt
    if algo == "kl_cov":
        return -a * r + sel * o.get("kl_cov_coef", 1.0) * d.abs()
    if algo == "cispo":
        return -torch.clamp(r, lo, hi).detach() * a * lp
    if algo == "sapo":
        tau = torch.where(a >= 0, a.new_tensor(1.0), a.new_tensor(1.05))
        return -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
    return -a * lp


def seq_weight(od, sp, o):
    lw = od - sp
    if o.get("level", "token") == "sequence":
        lw = lw.sum().expand(len(od))
    elif o.get("level") == "geometric":
        lw = lw.mean().expand(len(od))
    w = torch.exp(lw)
    low, cap = o.get("is_low") or 0.0, o.get("is_cap", 2.0)
    if o.get("mode", "truncate") == "truncate":
        return torch.clamp(w, min=low, max=cap)
    return torch.where((w >= low) & (w <= cap), w, torch.zeros_like(w))


def oracle(logp, ent, b, o, sel):
    """Loop over sequences: sums P_i, K_i, E_i; each aggregated with its own mode."""
    sums, start = [], 0
    for i, n in enumerate(LENGTHS):
        sl = slice(start, start + n)
        start += n
        m = b["mask"][sl].bool()
        lp, od = logp[sl][m], b["old"][sl][m]
        k = len(lp)
        if k == 0:
            sums.append((logp.sum() * 0, logp.sum() * 0, ent.sum() * 0, 0))
            continue
        a = b["adv_seq"][i].expand(k)
        pg = seq_pg(lp, od, a, sel[sl][m], o)
        w = seq_weight(od, b["sampler"][sl][m], o) if o.get("sampler") else torch.ones(k, dtype=F64)
        v = w if o.get("scope") == "loss" else torch.ones_like(w)
        kl = kl_oracle(lp - b["ref"][sl][m], o["kind"], o.get("kl_clamp"), o.get("kl_vclamp"))
        sums.append(((w * pg).sum(), (v * kl).sum(), (v * ent[sl][m]).sum(), k))

    def agg(col, mode):
        total = sum(s[3] for s in sums)
        if mode == "token_mean":
            return sum(s[col] for s in sums) / total
        if mode == "seq_mean":
            return sum(s[col] / max(s[3], 1) for s in sums) / len(sums)
        if mode == "seq_sum":
            return sum(s[col] for s in sums) / len(sums)
        return sum(s[col] for s in sums) / 7 / len(sums)

    mode = o["agg"]
    return (agg(0, mode) + o["beta"] * agg(1, o.get("kl_agg") or mode)
            - o["c_ent"] * agg(2, o.get("ent_agg") or mode))


def make_batch(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    logp = -torch.rand(n, generator=g, dtype=dtype) * 2 - 0.05
    return dict(logp=logp, old=logp + 0.3 * torch.randn(n, generator=g, dtype=dtype),
                ref=logp + 0.3 * torch.randn(n, generator=g, dtype=dtype),
                sampler=logp + 0.5 * torch.randn(n, generator=g, dtype=dtype),
                ent=torch.rand(n, generator=g, dtype=dtype) * 3, adv_seq=torch.randn(len(LENGTHS), generator=g,
                                                                                       dtype=dtype),
                mask=(torch.rand(n, generator=g) > 0.15).long(),
                cu=torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32))


CASES = {
    "ppo_tis_pg_kl_seq_ent_token": dict(algo="ppo", agg="token_mean", kl_agg="seq_mean", ent_agg="token_mean",
                                        kind="k3", sampler=True),
    "ppo_scope_loss_seqIS_mask": dict(algo="ppo", agg="seq_sum", kind="k2", sampler=True, scope="loss",
                                      level="sequence", mode="mask", is_low=0.3, is_cap=3.0, dual=3.0),
    "gspo_token_geoIS_abs_vclamp": dict(algo="gspo_token", agg="seq_mean", kind="abs", kl_vclamp=0.3,
                                        sampler=True, level="geometric", is_low=0.8, dual=3.0),
    "gmpo_k1plus_clamp": dict(algo="gmpo", eps_low=0.4, eps_high=0.4, agg="seq_mean", kind="k1+", kl_clamp=0.5,
                              ent_agg="token_mean", kl_agg="seq_mean_fixed_len"),
    "gspo_geoIS_mask_scope_loss": dict(algo="gspo", agg="token_mean", kind="k3+", sampler=True, level="geometric",
                                       mode="mask", is_low=0.7, is_cap=1.3, scope="loss"),
    "cispo_fixed_len_kl": dict(algo="cispo", eps_high=4.0, agg="seq_mean", kl_agg="seq_mean_fixed_len", kind="k1",
                               sampler=True, kl_vclamp=0.2),
    "sapo_seq_sum": dict(algo="sapo", agg="seq_sum", kind="k3", kl_clamp=0.2, ent_agg="seq_mean"),
    "reinforce_token_mask": dict(algo="reinforce", agg="seq_mean_fixed_len", kind="k2", sampler=True,
                                 mode="mask", is_cap=1.5),
    "clip_cov": dict(algo="clip_cov", agg="token_mean", kind="k3", sampler=True),
    "kl_cov": dict(algo="kl_cov", agg="token_mean", kind="k1", kl_cov_coef=0.5),
}


def options(o):
    kw = dict(algo=o["algo"], eps_low=o.get("eps_low", 0.2), eps_high=o.get("eps_high", 0.28),
              dual_clip=o.get("dual"), aggregation=o["agg"], kl_aggregation=o.get("kl_agg"),
              entropy_aggregation=o.get("ent_agg"), max_len=7, beta=o["beta"], kl_kind=o["kind"],
              kl_clamp=o.get("kl_clamp"), kl_value_clamp=o.get("kl_vclamp"), c_ent=o["c_ent"],
              is_cap=o.get("is_cap", 2.0), is_low=o.get("is_low"), is_level=o.get("level", "token"),
              is_mode=o.get("mode", "truncate"), is_scope=o.get("scope", "pg"))
    if o["algo"] == "kl_cov":
        kw["kl_cov_coef"] = o["kl_cov_coef"]
    return kw


def selection(b, o):
    """An explicit token selection for clip_cov / kl_cov (the selection rule has its own test)."""
    sel = torch.zeros(sum(LENGTHS), dtype=F64)
    if o["algo"] in ("clip_cov", "kl_cov"):
        sel[[0, 4, 9, 13]] = 1.0
    return sel


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_options_match_oracle(case, backend, monkeypatch):
    o = {"beta": 0.07, "c_ent": 0.02, "eps_low": 0.2, "eps_high": 0.28, **CASES[case]}
    b = make_batch(seed=sorted(CASES).index(case))
    sel = selection(b, o)
    if o["algo"] in ("clip_cov", "kl_cov"):  # pin the selection; cov_selection is tested on its own
        pl = importlib.import_module("fusedrl.kernels.policy_loss")
        monkeypatch.setattr(pl, "cov_selection", lambda x, cfg, gen: sel.to(x.logp.device, torch.float32))
    up = 0.7
    lp0, en0 = b["logp"].clone().requires_grad_(), b["ent"].clone().requires_grad_()
    expected = oracle(lp0, en0, b, o, sel)
    g_exp = torch.autograd.grad(expected * up, [lp0, en0])
    dtype = F64 if backend == "reference" else torch.float32
    if backend == "triton":
        monkeypatch.setattr(plt, "BLOCK", 4)
    cast = lambda x: x.to(dtype)  # noqa: E731
    lp, en = cast(b["logp"]).requires_grad_(), cast(b["ent"]).requires_grad_()
    loss, _ = call(backend, lp, cast(b["old"]), cast(b["adv_seq"]), b["mask"], cu_seqlens=b["cu"],
                   ref_logp=cast(b["ref"]), entropy=en, sampler_logp=cast(b["sampler"]) if o.get("sampler") else None,
                   **options(o))
    g = torch.autograd.grad(loss * up, [lp, en])
    tol = {} if backend == "reference" else dict(atol=2e-5, rtol=2e-4)
    assert_close(loss, expected.to(dtype), **tol, name="loss")
    assert_close(g[0], g_exp[0].to(dtype), **tol, name="dlogp")
    assert_close(g[1], g_exp[1].to(dtype), **tol, name="dentropy")


def verl_cov_selection(logp, old, adv, mask, algo, ratio, lb, ub, eps_low, eps_high, generator):
    """verl's core_algos selection, transcribed on one (1, N) row."""
    corr = torch.zeros_like(logp)
    valid = mask.bool()
    cov = (adv - adv[valid].mean()) * (logp - logp[valid].mean())
    n = int(valid.sum())
    if algo == "kl_cov":
        idx = torch.nonzero(valid).flatten()
        top = torch.topk(cov[idx], max(1, int(n * ratio)), largest=True).indices
        corr[idx[top]] = 1
        return corr
    r = torch.exp(logp - old)
    clip_by_origin = (-adv * torch.clamp(r, 1 - eps_low, 1 + eps_high) > -adv * r) & valid
    cov = torch.where(valid & ~clip_by_origin, cov, torch.tensor(-math.inf, dtype=cov.dtype))
    cand = torch.nonzero((cov < ub) & (cov > lb) & valid).flatten()
    perm = torch.randperm(len(cand), generator=generator)
    corr[cand[perm[:max(int(ratio * n), 1)]]] = 1
    return corr


@pytest.mark.parametrize("algo", ["clip_cov", "kl_cov"])
def test_cov_selection_matches_verl(algo):
    pl = importlib.import_module("fusedrl.kernels.policy_loss")

    g = torch.Generator().manual_seed(0)
    n = 400
    logp = -torch.rand(n, generator=g, dtype=F64) * 4
    old = logp + 0.1 * torch.randn(n, generator=g, dtype=F64)
    adv = torch.randn(n, generator=g, dtype=F64) * 3
    mask = (torch.rand(n, generator=g) > 0.1).long()
    cfg = pl.PolicyLossConfig(algo=algo, cov_ratio=0.02, cov_lb=0.5, cov_ub=3.0)
    x = pl.FlatInputs(logp=logp, old=old, adv=adv, mask=mask.bool(), ref=None, entropy=None, sampler=None)
    ours = pl.cov_selection(x, cfg, torch.Generator().manual_seed(5))
    theirs = verl_cov_selection(logp, old, adv, mask, algo, 0.02, 0.5, 3.0, 0.2, 0.2, torch.Generator().manual_seed(5))
    assert torch.equal(ours.double(), theirs)
    assert int(ours.sum()) == max(int(0.02 * int(mask.sum())), 1)
    # the end-to-end call uses that selection: clip_frac is the selected share
    _, m = policy_loss(logp, old, adv, mask, cu_seqlens=torch.tensor([0, 150, n], dtype=torch.int32), algo=algo,
                       cov_ratio=0.02, cov_lb=0.5, cov_ub=3.0, generator=torch.Generator().manual_seed(5),
                       advantages_layout="token")
    assert_close(m["clip_frac"], (ours.sum() / mask.sum()).float())


def test_bad_options():
    x, cu, adv = torch.zeros(5), torch.tensor([0, 2, 5], dtype=torch.int32), torch.zeros(2)
    for kw, match in ((dict(is_level="seq"), "is_level must be one of"), (dict(is_mode="drop"), "is_mode must be"),
                      (dict(is_scope="all"), "is_scope must be"), (dict(is_low=3.0), "is_low must be <= is_cap"),
                      (dict(kl_aggregation="sum"), "kl_aggregation must be one of"),
                      (dict(entropy_aggregation="x"), "entropy_aggregation must be one of"),
                      (dict(kl_value_clamp=0), "kl_value_clamp must be > 0"),
                      (dict(entropy_aggregation="seq_mean_fixed_len"), "needs max_len"),
                      (dict(algo="kl_cov", cov_ratio=2.0), "cov_ratio must be in"),
                      (dict(algo="gmpo", dual_clip=True), "dual_clip applies to")):
        with pytest.raises(ValueError, match=match):
            policy_loss(x, x, adv, cu_seqlens=cu, **kw)
