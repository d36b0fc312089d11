"""linear_policy_loss: equals an explicit-logits float64 GRPO loss (value and gradients), on the
reference and the Triton paths, padded and packed; never builds (N, V) logits itself."""
import importlib

import pytest
import torch

from fusedrl.kernels import force_backend, linear_policy_loss
from tests.conftest import assert_close

N_SEQ, T, H, V = 3, 5, 16, 37


def call(backend, *args, **kwargs):
    """linear_policy_loss on one backend: Triton on CUDA tensors when a GPU exists, else under
    the interpreter; leaves stay on the CPU (gradients flow back through .to)."""
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    move = lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
    with force_backend(backend):
        return linear_policy_loss(*map(move, args), **{k: move(v) for k, v in kwargs.items()})


def make(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_SEQ, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.3
    bias = torch.randn(V, generator=g, dtype=dtype) * 0.1
    labels = torch.randint(0, V, (N_SEQ, T), generator=g)
    labels[0, 0] = -100  # a prompt position
    mask = torch.ones(N_SEQ, T, dtype=torch.long)
    mask[2, 3:] = 0  # padding
    old = -torch.rand(N_SEQ, T, generator=g) * 3 - 1
    ref = old + 0.2 * torch.randn(N_SEQ, T, generator=g)
    adv = torch.randn(N_SEQ, generator=g)
    return hidden, weight, bias, labels, mask, old, ref, adv


def explicit_grpo(hidden, weight, bias, labels, mask, old, ref, adv, beta=0.04, eps=0.2, temperature=0.7):
    """Float64 oracle: full logits, log-softmax gather, k3, clipped ratio, masked token mean."""
    logits = (hidden.double() @ weight.double().T + bias.double()) / temperature
    valid = (labels != -100) & (mask != 0)
    safe = labels.clamp(min=0)
    logp = torch.log_softmax(logits, -1).gather(-1, safe[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old.double())
    a = adv.double()[:, None]
    pg = -torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    d = logp - ref.double()
    per_token = pg + beta * (torch.exp(-d) - 1 + d)
    return torch.where(valid, per_token, 0.0).sum() / valid.sum()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_matches_explicit_logits_grpo(backend, seed):
    hidden, weight, bias, labels, mask, old, ref, adv = make()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    expected = explicit_grpo(*leaves, labels, mask, old, ref, adv)
    up = 0.6
    g_exp = torch.autograd.grad(expected * up, leaves)
    ours_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = call(backend, ours_leaves[0], ours_leaves[1], labels, old, adv, mask, bias=ours_leaves[2],
                         temperature=0.7, ref_logp=ref, beta=0.04, kl_kind="k3", algo="grpo",
                         aggregation="token_mean")
    g = torch.autograd.grad(loss * up, ours_leaves)
    tol = dict(atol=2e-5, rtol=2e-4)
    assert_close(loss, expected, **tol, name="loss")
    for name, a, b in zip(("dhidden", "dweight", "dbias"), g, g_exp):
        assert_close(a, b, **tol, name=name)
    assert set(metrics) >= {"clip_frac", "ratio_mean", "approx_kl", "kl_ref", "response_len"}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_equals_padded_with_entropy_bonus(backend, seed):
    hidden, weight, bias, labels, mask, old, ref, adv = make(seed=1)
    keep = mask.bool()
    lengths = keep.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    kw = dict(bias=bias, ref_logp=None, c_ent=0.01, algo="ppo", aggregation="seq_mean")
    out = []
    for packed in (False, True):
        h = hidden.clone().requires_grad_()
        if packed:
            loss, m = call(backend, h[keep], weight, labels[keep], old[keep], adv, cu_seqlens=cu, **kw)
        else:
            loss, m = call(backend, h, weight, labels, old, adv, mask, **kw)
        out.append((loss, torch.autograd.grad(loss, h)[0], m))
    assert_close(out[1][0], out[0][0])
    assert_close(out[1][1], out[0][1])
    assert_close(out[1][2]["entropy"], out[0][2]["entropy"])


def test_never_builds_full_logits(monkeypatch):
    """The op goes through linear_logprobs only: a matmul producing (N, V) would show up here."""
    hidden, weight, bias, labels, mask, old, ref, adv = make(seed=2)
    calls = []
    # the package attribute of that name is the function; the module lives in sys.modules
    lpl = importlib.import_module("fusedrl.kernels.linear_policy_loss")

    real = lpl.linear_logprobs

    def spy(*args, **kwargs):
        calls.append(kwargs.get("return_entropy"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lpl, "linear_logprobs", spy)
    linear_policy_loss(hidden, weight, labels, old, adv, mask, compute_entropy=True)
    linear_policy_loss(hidden, weight, labels, old, adv, mask)
    assert calls == [True, False]


def test_bad_input():
    hidden, weight, bias, labels, mask, old, ref, adv = make()
    with pytest.raises(TypeError, match="computes the entropy itself"):
        linear_policy_loss(hidden, weight, labels, old, adv, entropy=old)
    with pytest.raises(TypeError, match="labels must have dtype"):
        linear_policy_loss(hidden, weight, labels.float(), old, adv)
    with pytest.raises(ValueError, match="mask must have labels' shape"):
        linear_policy_loss(hidden, weight, labels, old, adv, mask[:, :2])
    with pytest.raises(ValueError, match="algo must be one of"):
        linear_policy_loss(hidden, weight, labels, old, adv, algo="dpo")


def test_bench_grpo_smoke(tmp_path, capsys):
    """bench/bench_grpo.py at tiny CPU shapes: every provider checked against the fp32 reference."""
    from fusedrl.bench import bench_grpo

    assert bench_grpo.main(["--smoke", "--cases", "GRPO-0.5B", "--modes", "full",
                            "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fusedrl linear_policy_loss" in out and "unfused eager" in out
    lines = [line for line in out.splitlines() if line.startswith("GRPO-0.5B")]
    assert sum(line.rstrip().endswith("ok") for line in lines) == 2  # ours and eager passed the check
    assert len(list(tmp_path.glob("grpo-*.json"))) == 1
