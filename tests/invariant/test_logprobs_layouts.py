"""`linear_logprobs` and the GRPO / PPO losses in invariant mode: per-token log-probs, entropies and
hidden-state gradients bitwise equal for 20 sequences of mixed lengths in many random layouts and
micro-batch splits, on the torch path and on the Triton kernels (interpreter on CPU)."""
import random

import pytest
import torch

from fusedrl.kernels import force_backend, linear_logprobs, linear_policy_loss
from fusedrl.kernels.invariant import invariant
from tests.conftest import assert_close

H, V = 24, 203  # odd sizes
NUM_SEQS = 20


def _sequences(seed=0, max_len=40, vocab=V):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, max_len, (NUM_SEQS,), generator=g)]
    return [dict(hidden=torch.randn(n, H, generator=g), labels=torch.randint(0, vocab, (n,), generator=g),
                 adv=torch.randn((), generator=g).expand(n).clone(), old=-torch.rand(n, generator=g) * 3)
            for n in lengths]


def _layouts(count, seed):
    """(order, micro-batch sizes in sequences) pairs: random permutations, split at random points."""
    rng = random.Random(seed)
    out = [(list(range(NUM_SEQS)), [NUM_SEQS])]
    for _ in range(count):
        order = list(range(NUM_SEQS))
        rng.shuffle(order)
        sizes, left = [], NUM_SEQS
        while left:
            sizes.append(rng.randint(1, left))
            left -= sizes[-1]
        out.append((order, sizes))
    return out


def _run(seqs, weight, order, sizes, loss: str, total_tokens):
    """Per sequence: (logp, entropy, d loss / d hidden) computed in the given layout."""
    results, pos = {}, 0
    for size in sizes:
        chunk = order[pos:pos + size]
        pos += size
        hidden = torch.cat([seqs[i]["hidden"] for i in chunk]).requires_grad_(True)
        labels = torch.cat([seqs[i]["labels"] for i in chunk])
        if loss == "logprobs":
            logp, ent = linear_logprobs(hidden, weight, labels, temperature=0.8, return_entropy=True)
            # a fixed random-looking upstream gradient per sequence (not all ones: not the last layer)
            up = [torch.linspace(-1, 1, len(seqs[i]["labels"])) * (i + 1) for i in chunk]
            upstream, other = torch.cat(up), torch.cat([u.flip(0) for u in up])
            (logp * upstream + 0.1 * ent * other).sum().backward()
        else:  # one optimizer step's share: token_mean over the step's tokens, so splits add up
            cu = torch.tensor([0] + [len(seqs[i]["labels"]) for i in chunk]).cumsum(0).to(torch.int32)
            old = None if loss == "grpo" else torch.cat([seqs[i]["old"] for i in chunk])
            adv = torch.cat([seqs[i]["adv"] for i in chunk])
            value, _ = linear_policy_loss(hidden, weight, labels, old, adv, temperature=0.8, cu_seqlens=cu,
                                          algo="ppo", compute_entropy=True, num_tokens=total_tokens,
                                          advantages_layout="token")
            value.backward()
            logp, ent = linear_logprobs(hidden.detach(), weight, labels, temperature=0.8, return_entropy=True)
        starts = torch.tensor([0] + [len(seqs[i]["labels"]) for i in chunk]).cumsum(0).tolist()
        for j, i in enumerate(chunk):
            a, b = starts[j], starts[j + 1]
            results[i] = (logp[a:b].detach(), ent[a:b].detach(), hidden.grad[a:b])
    return results


def _check_layouts(loss, layouts=12, alone=(0, 7, 19), max_len=40, vocab=V):
    torch.manual_seed(0)
    seqs = _sequences(max_len=max_len, vocab=vocab)
    weight = torch.randn(vocab, H) * 0.5
    total = sum(len(s["labels"]) for s in seqs)
    base = None
    for order, sizes in _layouts(layouts, seed=len(loss)):
        got = _run(seqs, weight, order, sizes, loss, total)
        if base is None:
            base = got
            continue
        for i in range(NUM_SEQS):
            for name, a, b in zip(("logp", "entropy", "d hidden"), base[i], got[i]):
                assert torch.equal(a, b), f"{loss}: sequence {i} {name} differs in layout {order} {sizes}"
    # each sequence alone, padded into a (1, T) row: the same bits
    for i in alone:
        single = _run(seqs, weight, [i], [1], loss, total)[i]
        assert all(torch.equal(a, b) for a, b in zip(base[i], single))
    return base, seqs, weight


@pytest.mark.parametrize("loss", ["logprobs", "grpo", "ppo"])
def test_torch_path_is_bitwise_layout_invariant(loss):
    with invariant():
        base, seqs, weight = _check_layouts(loss)
    # and exact: the float64 oracle agrees within float32's tolerance
    h = torch.cat([s["hidden"] for s in seqs]).double()
    labels = torch.cat([s["labels"] for s in seqs])
    z = (h @ weight.double().T) / 0.8
    want = z.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    assert_close(torch.cat([base[i][0] for i in range(NUM_SEQS)]).double(), want, atol=1e-5, rtol=1e-5,
                 name="logp vs float64")


def test_triton_path_is_bitwise_layout_invariant():
    with invariant(), force_backend("triton"):
        # the interpreter runs every program in Python: 20 shorter sequences, a smaller vocabulary
        _check_layouts("logprobs", layouts=2, alone=(7,), max_len=12, vocab=45)
        _check_layouts("grpo", layouts=1, alone=(), max_len=12, vocab=45)


def test_invariant_gradients_match_the_default_path():
    """The invariant backward is the same math: d hidden / d weight / d bias agree with the default op."""
    torch.manual_seed(5)
    hidden = torch.randn(45, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (45,))
    labels[3] = -100
    g1, g2 = torch.randn(45, dtype=torch.float64), torch.randn(45, dtype=torch.float64)
    outs = []
    for mode in (False, True):
        with invariant(mode):
            logp, ent = linear_logprobs(hidden, weight, labels, bias=bias, temperature=1.3, return_entropy=True)
        grads = torch.autograd.grad((logp * g1 + ent * g2).sum(), (hidden, weight, bias))
        outs.append((logp, ent) + grads)
    for name, a, b in zip(("logp", "entropy", "dh", "dW", "db"), *outs):
        assert_close(b, a, name=name)
    assert outs[1][0][3] == 0 and outs[1][1][3] == 0


def test_default_mode_is_within_its_documented_tolerance():
    """Default mode: the same token's log-prob moves with the layout by at most 1e-5 (float32)."""
    torch.manual_seed(0)
    seqs = _sequences()
    weight = torch.randn(V, H) * 0.5
    total = sum(len(s["labels"]) for s in seqs)
    layouts = _layouts(4, seed=9)
    runs = [_run(seqs, weight, order, sizes, "logprobs", total) for order, sizes in layouts]
    runs.append({i: _run(seqs, weight, [i], [1], "logprobs", total)[i] for i in range(NUM_SEQS)})
    for got in runs[1:]:
        for i in range(NUM_SEQS):
            assert_close(got[i][0], runs[0][i][0], atol=1e-5, rtol=0, name="default-mode logp")
