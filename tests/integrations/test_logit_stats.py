"""linear_logprobs(return_logit_stats=True): mean logit and top-1 flag vs float64, both backends.

The statistics TRL's DPO trainer logs (`mean_logits`, `is_top1`) come out of the fused pass;
they must match a float64 `z.mean(-1)` / `z.argmax(-1) == label`, be 0/False at ignored
positions, carry no gradient and leave logp, entropy and every gradient unchanged.
"""
import pytest
import torch

from fusedrl.kernels import _dispatch, force_backend, linear_logprobs
from tests.conftest import assert_close

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not _dispatch.HAS_TRITON,
                                                                          reason="triton not importable"))]
IGNORE = -100


def _inputs(lead, hdim, vocab, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, hdim, generator=gen) * 1.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=gen) / hdim ** 0.25).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=gen).to(dtype).requires_grad_() if bias else None
    z = h.double() @ w.double().T + (b.double() if bias else 0.0)
    y = torch.randint(0, vocab, lead, generator=gen)
    top = torch.rand(lead, generator=gen) < 0.4  # many labels at the argmax, so is_top1 is not all False
    y = torch.where(top, z.argmax(-1), y)
    y[torch.rand(lead, generator=gen) < 0.2] = IGNORE
    return h, w, b, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,hdim,vocab,bias,tau,entropy", [
    ((37,), 24, 45, False, 1.0, False),
    ((3, 13), 20, 131, True, 0.7, True),
    ((2, 5), 8, 33, True, 1.3, False),
])
def test_stats_match_float64(backend, lead, hdim, vocab, bias, tau, entropy):
    h, w, b, y = _inputs(lead, hdim, vocab, torch.float32, bias, seed=vocab)
    with force_backend(backend):
        out = linear_logprobs(h, w, y, bias=b, temperature=tau, return_entropy=entropy, return_logit_stats=True)
        plain = linear_logprobs(h, w, y, bias=b, temperature=tau, return_entropy=entropy)
    assert len(out) == (4 if entropy else 3)
    mean, top1 = out[-2:]
    z = (h.double() @ w.double().T + (b.double() if bias else 0.0)) / tau
    valid = y != IGNORE
    assert mean.shape == lead and top1.shape == lead and top1.dtype == torch.bool
    assert not mean.requires_grad and not top1.requires_grad
    assert_close(mean.double(), torch.where(valid, z.mean(-1), 0.0), atol=1e-5, rtol=1e-5, name="mean_logits")
    assert torch.equal(top1, valid & (z.argmax(-1) == y))
    assert bool(top1.any())
    plain = plain if isinstance(plain, tuple) else (plain,)
    for a, p in zip(out[:len(plain)], plain):
        assert torch.equal(a, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_first_maximum(backend):
    # two vocabulary rows equal: their logits tie exactly; argmax picks the lower id
    h, w, _, _ = _inputs((9,), 16, 40, torch.float32, False, seed=3)
    with torch.no_grad():
        best = (h @ w.T).argmax(-1)
        w[39] = w[int(best[0])]
        w[0] = w[int(best[1])]
    z = h.detach() @ w.detach().T
    first = z.argmax(-1)
    y = torch.full((9,), 39)
    y[1] = 0
    y[2] = int(first[2])
    with force_backend(backend):
        _, mean, top1 = linear_logprobs(h, w, y, return_logit_stats=True)
    expected = first == y
    assert torch.equal(top1, expected)
    assert bool(expected[1]) and bool(expected[2]) and not bool(expected[0])  # w[39] ties an earlier row


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_unaffected(backend):
    h, w, b, y = _inputs((4, 11), 12, 70, torch.float32, True, seed=5)
    gen = torch.Generator().manual_seed(9)
    up, up_e = torch.randn(4, 11, generator=gen), torch.randn(4, 11, generator=gen)
    with force_backend(backend):
        logp, ent = linear_logprobs(h, w, y, bias=b, return_entropy=True)
        g_plain = torch.autograd.grad((logp * up).sum() + (ent * up_e).sum(), (h, w, b))
        logp, ent, mean, _ = linear_logprobs(h, w, y, bias=b, return_entropy=True, return_logit_stats=True)
        g_stats = torch.autograd.grad((logp * up).sum() + (ent * up_e).sum() + mean.sum() * 0, (h, w, b),
                                      allow_unused=True)
    for a, e in zip(g_stats, g_plain):
        assert torch.equal(a, e)


def test_bad_flag_raises():
    h, w, _, y = _inputs((3,), 4, 5, torch.float32, False, seed=0)
    with pytest.raises(TypeError, match="return_logit_stats"):
        linear_logprobs(h, w, y, return_logit_stats=1)
