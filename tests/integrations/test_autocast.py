"""Every public op under CPU autocast (bf16) against float64.

When the issue was filed the reference log-prob path ran its chunk matmul under autocast:
bf16 logits, log-p error vs float64 ~3e-2 instead of ~1e-6 (its current tiled form writes
through `out=` matmuls, which autocast leaves alone; the decorator now guarantees the
property for every op whatever its inner code). The "keep" ops must give their float32
results under autocast (nothing cast down; float32 logits and log-softmax), forward and
backward; varlen_attention ("lower") casts q, k, v to the autocast dtype and must equal the
float64 attention of those cast inputs.
"""
import pytest
import torch

from fusedrl.kernels import (_dispatch, dpo_loss, force_backend, ipo_loss, linear_logprobs, linear_policy_loss,
                             logprobs_from_logits, policy_loss, simpo_loss, varlen_attention)
from fusedrl.kernels._autocast import autocast_aware
from tests.conftest import assert_close

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not _dispatch.HAS_TRITON,
                                                                          reason="triton not importable"))]
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _head(seed=0, n=(3, 17), hdim=48, vocab=301):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(*n, hdim, generator=gen) * 2.0).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=gen) / hdim ** 0.25).requires_grad_()
    y = torch.randint(0, vocab, n, generator=gen)
    y[0, :3] = -100
    return h, w, y


def _oracle(h, w, y):
    logq = torch.log_softmax(h.double() @ w.double().T, -1)
    valid = y != -100
    return logq.gather(-1, y.clamp(min=0)[..., None])[..., 0] * valid


def _max_err(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_under_autocast_matches_float64(backend):
    h, w, y = _head()
    exact = _oracle(h, w, y)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    g_exact = torch.autograd.grad((exact * up).sum(), (h, w))
    with force_backend(backend), torch.autocast(**BF16):
        logp = linear_logprobs(h, w, y)
        assert logp.dtype == torch.float32
        g = torch.autograd.grad((logp * up).sum(), (h, w))  # backward inside the autocast region too
    assert _max_err(logp, exact) < 2e-5
    for a, e, name in zip(g, g_exact, ("d_hidden", "d_weight")):
        assert a.dtype == torch.float32
        assert_close(a.double(), e, atol=2e-5 * float(e.abs().max()), rtol=1e-4, name=name)


def test_decorator_turns_autocast_off_inside_the_op():
    """The mechanism: an op's inner matmul runs in bf16 under autocast unless the decorator
    turns autocast off ("keep") or casts the named inputs first ("lower")."""
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(33, 40, generator=gen), torch.randn(50, 40, generator=gen)

    def head(x, w):
        return torch.logsumexp(x @ w.T, -1), (x @ w.T).dtype

    exact = torch.logsumexp(a.double() @ b.double().T, -1)
    with torch.autocast(**BF16):
        plain, plain_dtype = head(a, b)
        kept, kept_dtype = autocast_aware("keep")(head)(a, b)
        seen = autocast_aware("lower", cast=("x",))(lambda x, w: (x.dtype, w.dtype, torch.is_autocast_enabled("cpu")))
        lowered = seen(a, b)
    assert plain_dtype == torch.bfloat16 and kept_dtype == torch.float32
    assert _max_err(plain, exact) > 1e-2 and _max_err(kept, exact) < 1e-4  # bf16 logits vs float32 logits
    assert lowered == (torch.bfloat16, torch.float32, False)  # only the named input is cast; autocast off inside


def test_logprobs_from_logits_and_bf16_inputs_under_autocast():
    h, w, y = _head(seed=2)
    logits = (h @ w.T).detach()
    with torch.autocast(**BF16):
        logp = logprobs_from_logits(logits, y)
        logp16 = linear_logprobs(h.bfloat16(), w.bfloat16(), y)  # bf16 inputs stay bf16, math in fp32
    assert _max_err(logp, _oracle(h, w, y)) < 2e-5
    assert _max_err(logp16, _oracle(h.bfloat16(), w.bfloat16(), y)) < 2e-5


def test_policy_and_preference_losses_under_autocast():
    gen = torch.Generator().manual_seed(4)
    logp = (torch.randn(4, 9, generator=gen) - 2).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(4, 9, generator=gen)
    adv = torch.randn(4, generator=gen)
    kw = dict(algo="grpo", aggregation="seq_mean")
    expected = policy_loss(logp.double(), old.double(), adv.double(), **kw)[0]
    c, r, rc, rr = (torch.randn(6, generator=gen) * 5 for _ in range(4))
    with torch.autocast(**BF16):
        got = policy_loss(logp, old, adv, **kw)[0]
        pref = [fn(c, r, rc, rr)[0] for fn in (dpo_loss, ipo_loss)]
        simpo = simpo_loss(c, r, torch.full((6,), 7), torch.full((6,), 5))[0]
    assert got.dtype == torch.float32 and abs(got.item() - expected.item()) < 1e-6
    for fn, value in zip((dpo_loss, ipo_loss), pref):
        exact = float(fn(c.double(), r.double(), rc.double(), rr.double())[0])
        assert value.dtype == torch.float32 and abs(float(value) - exact) < 1e-6 * max(1.0, abs(exact))
    assert abs(float(simpo) - float(simpo_loss(c.double(), r.double(), torch.full((6,), 7),
                                               torch.full((6,), 5))[0])) < 1e-6


def test_linear_policy_loss_under_autocast():
    h, w, y = _head(seed=6)
    adv = torch.randn(3, generator=torch.Generator().manual_seed(0))
    exact = policy_loss(_oracle(h, w, y), None, adv.double(), y != -100, algo="grpo")[0]
    with torch.autocast(**BF16):
        loss = linear_policy_loss(h, w, y, None, adv, algo="grpo")[0]
    assert abs(float(loss) - float(exact)) < 2e-5


def test_varlen_attention_casts_to_the_autocast_dtype():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(11, 4, 16, generator=gen) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    with torch.autocast(**BF16):
        out = varlen_attention(q, k.bfloat16(), v, cu, 7)  # mixed dtypes, as RoPE leaves q/k under autocast
    assert out.dtype == torch.bfloat16
    expected = varlen_attention(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), cu, 7)
    assert _max_err(out, expected) < 2e-2  # the output is rounded to bf16 once


def test_decorator_rejects_bad_policies():
    with pytest.raises(ValueError, match="policy"):
        autocast_aware("bf16")
    with pytest.raises(ValueError, match="cast="):
        autocast_aware("keep", cast=("x",))
    with pytest.raises(ValueError, match="no parameter"):
        autocast_aware("lower", cast=("nope",))(lambda x: x)


def _elementwise_cases():
    """The public ops without a matmul: autocast must not change them (checked, not assumed)."""
    from fusedrl.kernels import (bradley_terry_loss, dr_grpo_advantages, fold_kl_into_rewards, gae,
                                 grpo_advantages, kl_penalty, outcome_rm_loss, overlong_reward_shaping,
                                 plackett_luce_loss, reinforce_advantages, rloo_advantages, value_loss, whiten)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, generator=gen)
    y = torch.randn(4, 6, generator=gen)
    r = torch.randn(8, generator=gen)
    mask = torch.ones(4, 6)
    mask[2, 4:] = 0
    return {
        "kl_penalty": lambda: kl_penalty(x, y, "k3"),
        "value_loss": lambda: value_loss(x, y, x + 0.3, mask)[0],
        "bradley_terry_loss": lambda: bradley_terry_loss(r, r.flip(0))[0],
        "plackett_luce_loss": lambda: plackett_luce_loss(x)[0],
        "outcome_rm_loss": lambda: outcome_rm_loss(x, torch.tensor([1.0, 0.0, 1.0, 0.0]), mask)[0],
        "grpo_advantages": lambda: grpo_advantages(r, 4),
        "dr_grpo_advantages": lambda: dr_grpo_advantages(r, 4),
        "rloo_advantages": lambda: rloo_advantages(r, 4),
        "reinforce_advantages": lambda: reinforce_advantages(r, 0.5),
        "whiten": lambda: whiten(x, mask),
        "overlong_reward_shaping": lambda: overlong_reward_shaping(r, torch.arange(8) * 3, max_len=20, cache_len=6),
        "fold_kl_into_rewards": lambda: fold_kl_into_rewards(r[:4], x, y, mask, beta=0.1),
        "gae": lambda: gae(x, y, mask, gamma=0.99, lam=0.95)[0],
    }


@pytest.mark.parametrize("name", sorted(_elementwise_cases()))
def test_elementwise_ops_are_unchanged_by_autocast(name):
    fn = _elementwise_cases()[name]
    plain = fn()
    with torch.autocast(**BF16):
        cast = fn()
    assert cast.dtype == plain.dtype
    assert_close(cast, plain, atol=1e-6, rtol=1e-6, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_triton_path_matches_float64(dtype):
    """The Triton head under CUDA autocast: float32 master tensors stay float32 (IEEE or TF32 per
    torch's setting), logits and log-softmax in float32; statistics from the same pass."""
    torch.backends.cuda.matmul.allow_tf32 = False
    h, w, y = _head(seed=12, n=(4, 300), hdim=256, vocab=5003)
    h, w = h.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
    y = y.cuda()
    exact = _oracle(h, w, y)
    with torch.autocast(device_type="cuda", dtype=dtype):
        logp, mean, top1 = linear_logprobs(h, w, y, return_logit_stats=True)
        q = torch.randn(700, 8, 64, device="cuda")
        cu = torch.tensor([0, 300, 700], dtype=torch.int32, device="cuda")
        out = varlen_attention(q, q[:, :4], q[:, :4], cu, 400)
    assert logp.dtype == torch.float32 and out.dtype == dtype
    assert _max_err(logp, exact) < 1e-4
    z = h.double() @ w.double().T
    valid = y != -100
    assert _max_err(mean, torch.where(valid, z.mean(-1), 0.0)) < 1e-4
    assert bool((top1 == (valid & (z.argmax(-1) == y))).float().mean() > 0.999)
