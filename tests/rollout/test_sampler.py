"""Token sampling: exact distribution (chi-square), truncation, streams independent of the batch, log-probs."""
import math

import pytest
import torch

from fusedrl.rollout.native.sampler import TokenSampler, as_int64, draw, mix32, stream_key, uniforms
from fusedrl.rollout.sampling import SamplingParams

DRAWS = 20_000


def exact_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The truncated next-token distribution in float64, from the definitions (sorted, host loop)."""
    p = torch.softmax(logits.double() / temperature, dim=0)
    order = sorted(range(len(p)), key=lambda v: -float(p[v]))
    keep = set(order[:top_k] if top_k else order)
    mass, nucleus = 0.0, set()
    for v in order:  # top-p over what top-k kept, renormalised
        if v not in keep:
            continue
        if mass >= top_p * sum(float(p[u]) for u in keep):
            break
        nucleus.add(v)
        mass += float(p[v])
    keep &= nucleus
    if min_p:
        keep = {v for v in keep if float(p[v]) >= min_p * float(p[order[0]])}
    q = torch.zeros_like(p)
    for v in keep:
        q[v] = p[v]
    return q / q.sum()


def chi_square_pvalue(counts, probs):
    """P(chi2 >= stat) over the cells with positive probability (dof = cells - 1)."""
    cells = probs > 0
    expected = probs[cells] * counts.sum()
    stat = float(((counts[cells] - expected) ** 2 / expected).sum())
    dof = int(cells.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.3, 0.0, -0.4, -0.8, -1.5, -2.5])


@pytest.mark.parametrize("kw", [dict(), dict(top_k=4), dict(top_p=0.8), dict(min_p=0.15),
                                dict(top_k=6, top_p=0.9, min_p=0.05)])
def test_draws_follow_the_exact_truncated_softmax(kw):
    params = SamplingParams(temperature=0.8, **kw)
    sampler = TokenSampler(params)
    logits = LOGITS[None].expand(DRAWS, -1)
    streams = torch.tensor([as_int64(stream_key(7, i, 0)) for i in range(DRAWS)])
    tokens, _, _ = sampler(logits, streams, torch.zeros(DRAWS, dtype=torch.int64))
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    probs = exact_probs(LOGITS, 0.8, **kw)
    assert counts[probs == 0].sum() == 0, "a truncated token was drawn"
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_one_stream_over_steps_also_follows_the_softmax():
    sampler = TokenSampler(SamplingParams(temperature=1.3))
    streams = torch.full((DRAWS,), as_int64(stream_key(0, 3, 2)))
    tokens, _, _ = sampler(LOGITS[None].expand(DRAWS, -1), streams, torch.arange(DRAWS))
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    assert chi_square_pvalue(counts, exact_probs(LOGITS, 1.3)) > 1e-3


def test_a_wrong_distribution_is_rejected():
    """The test has power: draws at temperature 1 fail against the temperature-0.8 distribution."""
    sampler = TokenSampler(SamplingParams(temperature=1.0))
    streams = torch.tensor([as_int64(stream_key(1, i, 0)) for i in range(DRAWS)])
    tokens, _, _ = sampler(LOGITS[None].expand(DRAWS, -1), streams, torch.zeros(DRAWS, dtype=torch.int64))
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    assert chi_square_pvalue(counts, exact_probs(LOGITS, 0.8)) < 1e-6


def test_rows_do_not_depend_on_the_batch():
    sampler = TokenSampler(SamplingParams(temperature=1.0, top_p=0.9))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    streams = torch.tensor([as_int64(stream_key(5, i, i % 2)) for i in range(6)])
    steps = torch.arange(6) * 3
    whole, _, _ = sampler(logits, streams, steps)
    for i in range(6):
        alone, _, _ = sampler(logits[i:i + 1], streams[i:i + 1], steps[i:i + 1])
        assert int(alone) == int(whole[i])


def test_logprobs_are_full_vocab_before_truncation_and_greedy_at_temperature_one():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    streams, steps = torch.arange(4), torch.zeros(4, dtype=torch.int64)
    tokens, logp, top = TokenSampler(SamplingParams(temperature=0.7, top_k=3, logprobs_topk=5))(logits, streams, steps)
    full = torch.log_softmax(logits.double() / 0.7, -1)
    torch.testing.assert_close(logp.double(), full.gather(1, tokens[:, None]).squeeze(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(top[0].double(), full.topk(5).values, atol=1e-6, rtol=0)
    assert torch.equal(top[1], full.topk(5).indices)
    tokens, logp, _ = TokenSampler(SamplingParams(temperature=0.0))(logits, streams, steps)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logp.double(), torch.log_softmax(logits.double(), -1).max(-1).values, atol=1e-6, rtol=0)


def test_uniforms_are_in_the_open_interval_and_uncorrelated_across_steps():
    u = uniforms(torch.full((4096,), as_int64(stream_key(0, 0, 0))), torch.arange(4096))
    assert u.dtype == torch.float32 and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    a, b = u[:-1].double() - 0.5, u[1:].double() - 0.5
    assert abs(float((a * b).mean() / (a * a).mean())) < 0.05
    streams = torch.tensor([as_int64(stream_key(0, i, j)) for i in range(64) for j in range(64)])
    v = uniforms(streams, torch.zeros_like(streams))
    assert abs(float(v.mean()) - 0.5) < 0.01 and len(set(v.tolist())) > 4000


def test_draw_never_picks_a_truncated_token_even_at_the_edges():
    kept = torch.tensor([[float("-inf"), 0.0, float("-inf"), 1.0, float("-inf")]]).expand(3, -1)
    u = torch.tensor([1e-9, 0.5, 1.0 - 2 ** -24])
    assert draw(kept, u).tolist() == [1, 3, 3]


def test_mix32_matches_the_reference_hash():
    def ref(x):  # lowbias32 in Python integers
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 12345, 0xFFFFFFFF, 0xDEADBEEF, 2**31]
    assert mix32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]
    assert stream_key(0, 1, 2) != stream_key(0, 2, 1) and stream_key(0, 0, 0) != stream_key(1, 0, 0)
    assert all(0 <= stream_key(s, 3, 4) < 2**64 for s in (-5, 0, 2**70))
    assert math.isfinite(float(uniforms(torch.tensor([as_int64(2**64 - 1)]), torch.tensor([0])).sum()))
