"""KL estimators: hand values, gradients (float64 gradcheck), straight-through k3+, clamp, bad input."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedrl.kernels import AdaptiveKLController, kl_penalty
from fusedrl.kernels import kl as kl_module
from tests.conftest import assert_close

LOGP = [0.0, -1.0, -0.5]
REF = [0.0, -0.5, -1.0]
# delta = logp - ref = [0, -0.5, 0.5]
EXPECTED = {
    "k1": [0.0, -0.5, 0.5],
    "k2": [0.0, 0.125, 0.125],  # delta^2 / 2
    # exp(-delta) - 1 + delta: exp(0.5) - 1.5 = 0.1487212707, exp(-0.5) - 0.5 = 0.1065306597
    "k3": [0.0, math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5],
}
EXPECTED["k3+"] = EXPECTED["k3"]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "k3+"])
def test_hand_values(kind):
    out = kl_penalty(torch.tensor(LOGP), torch.tensor(REF), kind)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor(EXPECTED[kind]), name=kind)


def test_k3_is_nonnegative_and_bf16_returns_float32(seed):
    logp = torch.randn(37, 5).to(torch.bfloat16)
    ref = torch.randn(37, 5).to(torch.bfloat16)
    out = kl_penalty(logp, ref, "k3")
    assert out.dtype == torch.float32 and bool((out >= 0).all())


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_gradcheck_float64(kind, seed):
    logp = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, kind), (logp, ref))


def test_analytic_gradients_with_random_upstream(seed):
    logp = torch.randn(11, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(11, dtype=torch.float64)
    up = torch.randn(11, dtype=torch.float64)
    delta = (logp - ref).detach()
    expected = {"k1": torch.ones_like(delta), "k2": delta, "k3": 1 - torch.exp(-delta), "k3+": delta}
    for kind, d in expected.items():
        (g,) = torch.autograd.grad(kl_penalty(logp, ref, kind), logp, up)
        assert_close(g, up * d, name=f"d{kind}/dlogp")


def test_k3_plus_value_of_k3_gradient_of_k2(seed):
    logp = torch.randn(13, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(13, dtype=torch.float64)
    up = torch.randn(13, dtype=torch.float64)
    plus = kl_penalty(logp, ref, "k3+")
    assert_close(plus, kl_penalty(logp, ref, "k3"), name="k3+ value")
    (g_plus,) = torch.autograd.grad(plus, logp, up)
    (g_k2,) = torch.autograd.grad(kl_penalty(logp, ref, "k2"), logp, up)
    assert_close(g_plus, g_k2, name="k3+ grad")


def test_clamp_bounds_delta_and_stops_gradient():
    logp = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-20.0, 1.0], dtype=torch.float64)  # delta = [20, -1]
    out = kl_penalty(logp, ref, "k3", clamp=10.0)
    # delta 20 -> 10: exp(-10) - 1 + 10; delta -1 is inside: exp(1) - 2
    assert_close(out, torch.tensor([math.exp(-10) + 9, math.e - 2], dtype=torch.float64))
    (g,) = torch.autograd.grad(out.sum(), logp)
    assert_close(g, torch.tensor([0.0, 1 - math.e], dtype=torch.float64))
    assert torch.isinf(kl_penalty(torch.tensor([0.0]), torch.tensor([1000.0]), "k3")).all()


def test_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="kind must be one of"):
        kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="ref_logp must have logp's shape"):
        kl_penalty(x, torch.zeros(4), "k1")
    with pytest.raises(TypeError, match="logp must have dtype"):
        kl_penalty(torch.zeros(3, dtype=torch.int64), x, "k1")
    with pytest.raises(TypeError, match="ref_logp must be a torch.Tensor"):
        kl_penalty(x, [0.0, 0.0, 0.0], "k1")
    with pytest.raises(ValueError, match="clamp must be > 0"):
        kl_penalty(x, x, "k3", clamp=-1.0)


def test_adaptive_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # kl 12 -> error clip(12/6 - 1, -0.2, 0.2) = 0.2; beta = 0.1 * (1 + 0.2 * 1000 / 10000) = 0.102
    assert ctl.update(12.0, 1000) == pytest.approx(0.102)
    # kl 5.4 -> error -0.1; beta = 0.102 * (1 - 0.1 * 0.1) = 0.10098
    assert ctl.update(5.4, 1000) == pytest.approx(0.10098)
    with pytest.raises(ValueError, match="target must be a positive number"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_abs_and_k1_plus_hand_and_gradients():
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor(REF, dtype=torch.float64)
    up = torch.tensor([0.3, -1.1, 0.7], dtype=torch.float64)
    delta = torch.tensor([0.0, -0.5, 0.5], dtype=torch.float64)
    for kind, value, grad in (("abs", delta.abs(), torch.sign(delta)), ("k1+", delta, delta)):
        out = kl_penalty(logp, ref, kind)
        assert_close(out, value, name=kind)  # abs: |delta|; k1+: the value of k1 ...
        (g,) = torch.autograd.grad(out, logp, up)
        assert_close(g, up * grad, name=f"d{kind}")  # ... and the gradient of k2 (delta)


def test_value_clamp_and_k3_precision():
    # verl low_var_kl: delta clamped to +-20, k3 clamped to +-10; delta = -15: k3 = e^15 - 16 -> 10, no gradient
    logp = torch.tensor([-15.0, 0.5], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(2, dtype=torch.float64)
    out = kl_penalty(logp, ref, "k3", clamp=20.0, value_clamp=10.0)
    assert_close(out, torch.tensor([10.0, math.exp(-0.5) - 0.5], dtype=torch.float64))
    (g,) = torch.autograd.grad(out.sum(), logp)
    assert_close(g, torch.tensor([0.0, 1 - math.exp(-0.5)], dtype=torch.float64))
    # near 0, float32 k3 keeps its digits (exp(-d) - 1 + d, even expm1(-d) + d, would be noise)
    d = torch.tensor([1e-6, -3e-4, 2e-3, -0.05, 0.099, 0.101, 0.7])
    exact = torch.tensor([sum((-x) ** k / math.factorial(k) for k in range(2, 30)) for x in d.double().tolist()],
                         dtype=torch.float64)
    assert_close(kl_penalty(d, torch.zeros(7), "k3"), exact.float(), atol=0, rtol=2e-6)
    d64 = d.double().requires_grad_()
    (g,) = torch.autograd.grad(kl_penalty(d64, torch.zeros(7, dtype=torch.float64), "k3").sum(), d64)
    assert_close(g, -torch.expm1(-d64.detach()), atol=0, rtol=1e-8)
    with pytest.raises(ValueError, match="value_clamp must be > 0"):
        kl_penalty(logp, ref, "k3", value_clamp=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_node_matches_the_series_formula(dtype):
    # k3_value's one autograd node (in-place value, expm1 gradient) against the plain formula under autograd
    from fusedrl.kernels.kl import _k3_series, k3_value

    gen = torch.Generator().manual_seed(3)
    d = torch.cat([torch.randn(301, generator=gen, dtype=torch.float64) * s for s in (1e-4, 0.05, 0.3, 4.0)])
    d = torch.cat([d, torch.tensor([0.0, 0.1, -0.1, 0.0999, -30.0, 30.0], dtype=torch.float64)]).to(dtype)
    a, b = d.clone().requires_grad_(), d.clone().requires_grad_()
    fast, plain = k3_value(a), _k3_series(b)
    # the float64 series is exact to ~1e-12; float32 k3 (evaluated in float64) must round it within 4 eps,
    # where the float32 series formula itself is off by ~1e-6 relative at |d| ~ 0.1
    exact_value = _k3_series(d.double()).to(dtype)
    assert_close(fast, exact_value, atol=0, rtol=4 * torch.finfo(dtype).eps)
    assert_close(fast, plain, atol=0, rtol=4 * torch.finfo(dtype).eps if dtype == torch.float64 else 3e-6)
    up = torch.randn(d.shape, generator=gen, dtype=torch.float64).to(dtype)
    (ga,), (gb,) = torch.autograd.grad(fast, a, up), torch.autograd.grad(plain, b, up)
    exact = (-torch.expm1(-d.double()) * up.double()).to(dtype)  # 1 - exp(-d), which the series only approximates
    assert_close(ga, exact, atol=0, rtol=4 * torch.finfo(dtype).eps)
    assert_close(gb, exact, atol=1e-12, rtol=1e-5)
    with torch.no_grad():
        assert_close(k3_value(d), exact_value, atol=0, rtol=4 * torch.finfo(dtype).eps)


def test_k3_second_derivative_raises_instead_of_lying():
    # the k3 node saves its gradient as a constant: a double backward must fail loudly
    logp = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(kl_penalty(logp, torch.zeros(5, dtype=torch.float64), "k3").sum(), logp,
                               create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), logp)


# ----------------------------------------------------------------------------- the C++ k3 loop (csrc/kl.cpp)

def _ulps(a: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|a - exact| in float32 ulps of the exact value (exact in float64)."""
    spacing = torch.nextafter(exact.float().abs(), torch.tensor(float("inf"))).double() - exact.float().abs().double()
    return (a.double() - exact).abs() / spacing


def _hostile_deltas(gen):
    scales = (1e-7, 1e-4, 0.01, 0.2, 0.2499, 0.25, 0.2501, 1.0, 5.0, 80.0)
    d = torch.cat([torch.randn(2001, generator=gen, dtype=torch.float64) * s for s in scales])
    edges = [0.0, -0.0, 0.25, -0.25, 88.0, -88.0, -88.8, 700.0, -708.5, 1e30, -1e30, 1e-40]
    return torch.cat([d, torch.tensor(edges, dtype=torch.float64)]).float()


@pytest.mark.skipif(kl_module._C is None, reason="fusedrl.kernels._cpu is not built (FUSEDRL_NO_EXT=1)")
def test_cpp_k3_is_within_one_ulp_everywhere_and_matches_torch_on_non_finite(seed):
    gen = torch.Generator().manual_seed(11)
    d = _hostile_deltas(gen)
    value, grad = kl_module._k3_and_grad_cpp(d, True)
    exact = kl_module._k3_series(d.double())  # float64 series / expm1: ~1e-15 relative
    exact_grad = -torch.expm1(-d.double())
    finite = torch.isfinite(exact.float())
    assert _ulps(value[finite], exact[finite]).max() <= 1.0
    assert bool((value[~finite] == float("inf")).all())  # k3 beyond float32's range rounds to inf
    finite_g = torch.isfinite(exact_grad.float())
    assert _ulps(grad[finite_g], exact_grad[finite_g]).max() <= 1.0
    assert torch.equal(kl_module._k3_and_grad_cpp(d, False)[0], value)  # value-only loop: same values
    # non-finite inputs: what the PyTorch path (expm1 in float64) gives, NaN where it gives NaN
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    v, g = kl_module._k3_and_grad_cpp(special, True)
    e = torch.expm1(-special.double())
    assert torch.equal(v.isnan(), (e + special.double()).isnan())
    assert v[0] == float("inf") and g[0] == 1.0 and g[1] == -float("inf") and g[2].isnan()


@pytest.mark.skipif(kl_module._C is None, reason="fusedrl.kernels._cpu is not built (FUSEDRL_NO_EXT=1)")
def test_kl_penalty_fused_pair_equals_the_unfused_and_the_torch_path(seed, monkeypatch):
    # the fused (logp, ref) pass computes the same float32 difference, so the same bits as k3 of delta;
    # without the extension the PyTorch path agrees within the 4-eps budget; gradients +-dk3 * upstream
    gen = torch.Generator().manual_seed(5)
    logp = (torch.randn(3, 1032, generator=gen) * 0.4 - 2.0)[:, ::2]  # non-contiguous view
    ref = torch.randn(3, 1032, generator=gen)[:, 1::2] * 0.4 - 2.0
    a, b = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    fused = kl_penalty(a, b, "k3")
    assert fused.shape == logp.shape and fused.dtype == torch.float32
    unfused = kl_module.k3_value(logp - ref)
    assert torch.equal(fused, unfused)
    up = torch.randn(fused.shape, generator=gen)
    ga, gb = torch.autograd.grad(fused, (a, b), up)
    exact = -torch.expm1(-(logp - ref).double()) * up.double()
    assert_close(ga, exact.float(), atol=0, rtol=4 * torch.finfo(torch.float32).eps)
    assert torch.equal(gb, -ga)
    monkeypatch.setattr(kl_module, "_C", None)
    c, dref = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    torch_path = kl_penalty(c, dref, "k3")
    assert_close(fused, torch_path.detach(), atol=0, rtol=4 * torch.finfo(torch.float32).eps)
    gc, gd = torch.autograd.grad(torch_path, (c, dref), up)
    assert_close(ga, gc, atol=0, rtol=4 * torch.finfo(torch.float32).eps)
    assert_close(gb, gd, atol=0, rtol=4 * torch.finfo(torch.float32).eps)


@pytest.mark.skipif(kl_module._C is None, reason="fusedrl.kernels._cpu is not built (FUSEDRL_NO_EXT=1)")
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_every_instruction_set_build_gives_the_same_results(isa):
    # the loops are compiled for AVX-512, AVX2 + FMA and baseline x86-64 (the widest the CPU has runs);
    # FUSEDRL_CPU_ISA narrows the choice, so the builds this CPU does not pick are checked here too:
    # k3 within 1 ulp and the clipped-surrogate pass bitwise equal to the PyTorch pass
    code = (
        "import torch, importlib\n"
        "from fusedrl.kernels import _cpu\n"
        "import tests.kernels.test_kl as k, tests.kernels.test_policy_loss_cpu as p\n"
        "class MP:\n"
        "    def setattr(self, obj, name, value): setattr(obj, name, value)\n"
        "kl = importlib.import_module('fusedrl.kernels.kl'); ext = kl._C\n"
        "assert _cpu.k3_isa() == _cpu.ppo_clip_isa()\n"
        "k.test_cpp_k3_is_within_one_ulp_everywhere_and_matches_torch_on_non_finite(None)\n"
        "for agg in ('token_mean', 'seq_mean'):\n"
        "    kl._C = ext\n"
        "    p.test_cpp_surrogate_pass_equals_the_torch_pass_bitwise(4099, agg, MP())\n"
        "print(_cpu.k3_isa())\n"
    )
    env = {**os.environ, "FUSEDRL_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() in (isa, "baseline")  # a CPU without AVX2 runs the baseline build
