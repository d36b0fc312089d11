"""The CPU path of policy_loss (dot products with per-token coefficients) against the per-sequence
statement `policy_loss_reference` + `aggregate` + `summarise`, float64, garbage in masked positions."""
import importlib

import pytest
import torch

from tests.conftest import assert_close

pl = importlib.import_module("fusedrl.kernels.policy_loss")
from fusedrl.kernels._policy_loss_cpu import policy_loss_cpu  # noqa: E402

CONFIGS = [
    dict(algo="grpo", beta=0.04, c_ent=0.01, is_cap=1.5),
    dict(algo="ppo", beta=0.1, kl_kind="k3+", dual_clip=True, aggregation="seq_mean", kl_aggregation="token_mean"),
    dict(algo="gspo", aggregation="seq_mean", is_level="sequence", is_scope="loss", beta=0.02, c_ent=0.05),
    dict(algo="sapo", aggregation="seq_sum", entropy_aggregation="seq_mean_fixed_len", max_len=9, c_ent=0.1,
         is_mode="mask", is_low=0.5),
    dict(algo="gmpo", aggregation="seq_mean_fixed_len", max_len=11, beta=0.3, kl_kind="abs", is_veto=0.3),
    dict(algo="cispo", aggregation="token_mean", beta=0.05, kl_kind="k2", kl_value_clamp=0.5),
]


def _inputs(gen):
    lengths = [5, 0, 9, 1, 7]
    n = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    draw = lambda scale=1.0: torch.randn(n, generator=gen, dtype=torch.float64) * scale  # noqa: E731
    mask = torch.rand(n, generator=gen) > 0.25
    old = -draw().abs()
    logp = old + draw(0.3)
    tensors = dict(logp=logp, old=old, adv=draw(), ref=old + draw(0.2), entropy=draw().abs(), sampler=old + draw(0.2))
    for t in tensors.values():
        t[~mask] = float("nan")  # padding garbage must not leak into values or gradients
    tensors["logp"].requires_grad_()
    tensors["entropy"].requires_grad_()
    return tensors, mask, cu


@pytest.mark.parametrize("options", CONFIGS, ids=[c["algo"] for c in CONFIGS])
@pytest.mark.parametrize("normalise", [False, True])
def test_cpu_path_matches_the_per_sequence_sums(options, normalise):
    gen = torch.Generator().manual_seed(7)
    t, mask, cu = _inputs(gen)
    cfg = pl.PolicyLossConfig(**options)
    layout = pl.make_layout(t["logp"], cu)
    x = pl.FlatInputs(logp=t["logp"], old=t["old"], adv=t["adv"], mask=mask, ref=t["ref"], entropy=t["entropy"],
                      sampler=t["sampler"])
    num_tokens, num_seqs = (13.0, 4) if normalise else (None, None)
    loss, sums, tokens = policy_loss_cpu(x, layout, cfg, num_tokens, num_seqs)
    terms, stats = pl.policy_loss_reference(x, layout, cfg)
    expected = pl.aggregate(terms, stats[0], layout, cfg, num_tokens, num_seqs)
    assert torch.isfinite(loss)
    assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    up = torch.randn((), generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(loss, (t["logp"], t["entropy"]), up, allow_unused=True)
    want = torch.autograd.grad(expected, (t["logp"], t["entropy"]), up, allow_unused=True)
    for g, w in zip(got, want):
        g = torch.zeros_like(t["logp"]) if g is None else g
        w = torch.zeros_like(t["logp"]) if w is None else w
        assert torch.isfinite(g).all()
        assert_close(g, w, rtol=1e-10, atol=1e-14)
    assert_close(sums, stats.sum(dim=1), rtol=1e-6, atol=1e-7)
    assert_close(tokens, stats[0])


FAST_CONFIGS = [
    dict(algo="grpo", beta=0.04),
    dict(algo="ppo", beta=0.1, c_ent=0.01, aggregation="seq_mean", kl_aggregation="token_mean",
         entropy_aggregation="seq_sum"),
    dict(algo="grpo", eps_high=0.28, aggregation="seq_mean_fixed_len", max_len=9, c_ent=0.05),
    dict(algo="ppo", beta=0.0, kl_kind="k2"),  # ref given for the kl_ref metric only
]


@pytest.mark.parametrize("options", FAST_CONFIGS, ids=[str(i) for i in range(len(FAST_CONFIGS))])
@pytest.mark.parametrize("garbage", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_path_matches_the_general_path(options, garbage, dtype):
    # PPO / GRPO without sampler weights: values and per-token gradients in one no-grad sweep (`policy_loss_fast`);
    # garbage under the mask makes it hand over to the general path (the same numbers either way)
    from fusedrl.kernels import _policy_loss_cpu as cpu

    gen = torch.Generator().manual_seed(11)
    t, mask, cu = _inputs(gen)
    t = {k: v.detach().to(dtype) for k, v in t.items()}
    if not garbage:
        for v in t.values():
            v[~mask] = 0.5  # finite padding
    t["logp"].requires_grad_()
    t["entropy"].requires_grad_()
    cfg = pl.PolicyLossConfig(**options)
    layout = pl.make_layout(t["logp"], cu)
    x = pl.FlatInputs(logp=t["logp"], old=t["old"], adv=t["adv"], mask=mask, ref=t["ref"], entropy=t["entropy"],
                      sampler=None)
    assert cpu.fast_path_applies(x, cfg)
    assert (cpu.policy_loss_fast(x, layout, cfg, None, None) is None) == garbage
    loss, sums, tokens = policy_loss_cpu(x, layout, cfg, None, None)
    want_loss, want_sums, want_tokens = cpu.policy_loss_general(x, layout, cfg, None, None)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close(loss, want_loss, rtol=rtol, atol=rtol)
    up = torch.randn((), generator=gen, dtype=dtype)
    got = torch.autograd.grad(loss, (t["logp"], t["entropy"]), up, allow_unused=True)
    want = torch.autograd.grad(want_loss, (t["logp"], t["entropy"]), up, allow_unused=True)
    for g, w in zip(got, want):
        g = torch.zeros_like(t["logp"]) if g is None else g
        w = torch.zeros_like(t["logp"]) if w is None else w
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert_close(g, w, rtol=rtol, atol=rtol * 1e-2)
    assert_close(sums, want_sums, rtol=2e-6, atol=1e-7)
    assert_close(tokens, want_tokens)


def test_fast_path_scope():
    from fusedrl.kernels._policy_loss_cpu import fast_path_applies

    t, mask, cu = _inputs(torch.Generator().manual_seed(1))
    x = pl.FlatInputs(logp=t["logp"], old=t["old"], adv=t["adv"], mask=mask, ref=t["ref"], entropy=None,
                      sampler=None)
    assert fast_path_applies(x, pl.PolicyLossConfig(algo="grpo", beta=0.04))
    for options in (dict(algo="gspo"), dict(algo="grpo", dual_clip=True), dict(algo="grpo", beta=0.1, kl_kind="k2"),
                    dict(algo="grpo", beta=0.1, kl_clamp=10.0)):
        assert not fast_path_applies(x, pl.PolicyLossConfig(**options))
    x.sampler = t["sampler"]
    assert not fast_path_applies(x, pl.PolicyLossConfig(algo="grpo"))


@pytest.mark.skipif(importlib.import_module("fusedrl.kernels.kl")._C is None,
                    reason="fusedrl.kernels._cpu is not built (FUSEDRL_NO_EXT=1)")
@pytest.mark.parametrize("n", [1, 17, 4099])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_cpp_surrogate_pass_equals_the_torch_pass_bitwise(n, aggregation, monkeypatch):
    # float32 fast path: the C++ per-token pass (csrc/policy_loss.cpp) must give the very gradient bits
    # of the PyTorch code it replaces (the demo's GRPO trains bitwise the same), and the same loss and
    # metric totals up to float32 summation order; ratios far on both sides of the clip range
    from fusedrl.kernels import _policy_loss_cpu as cpu
    from fusedrl.kernels import kl

    gen = torch.Generator().manual_seed(n)
    cuts = torch.randint(0, n + 1, (max(1, n // 20),), generator=gen).sort().values  # empty sequences too
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([n])]).to(torch.int32)
    old = -torch.rand(n, generator=gen) * 3
    logp = (old + torch.randn(n, generator=gen) * 0.5).requires_grad_()
    adv = torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) > 0.2
    ent = torch.rand(n, generator=gen).requires_grad_()
    cfg = pl.PolicyLossConfig(algo="grpo", eps_low=0.2, eps_high=0.28, aggregation=aggregation, c_ent=0.01, beta=0.04)
    x = pl.FlatInputs(logp=logp, old=old, adv=adv, mask=mask, ref=old + 0.1 * torch.randn(n, generator=gen),
                      entropy=ent, sampler=None)
    layout = pl.make_layout(logp, cu)
    up = torch.randn((), generator=gen)
    results = []
    for ext in (kl._C, None):
        monkeypatch.setattr(kl, "_C", ext)
        loss, sums, tokens = cpu.policy_loss_fast(x, layout, cfg, None, None)
        grads = torch.autograd.grad(loss, (logp, ent), up)
        results.append((loss.detach(), sums, tokens, grads))
    (loss_c, sums_c, tok_c, (g_c, e_c)), (loss_t, sums_t, tok_t, (g_t, e_t)) = results
    assert torch.equal(g_c, g_t) and torch.equal(e_c, e_t)
    assert_close(loss_c, loss_t, rtol=2e-6, atol=1e-7)
    assert_close(sums_c, sums_t, rtol=2e-6, atol=1e-6)
    assert torch.equal(tok_c, tok_t)
    assert int(sums_c[1]) > 0 or n < 100  # the clip is exercised
