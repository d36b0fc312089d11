"""CPU micro-benchmarks as pytest-benchmark cases: each fusedrl case beside its eager peer (same group).

    make bench-cpu
    # = pytest bench/test_cpu_bench.py --benchmark-enable --benchmark-autosave --benchmark-compare
    #   --benchmark-group-by=group --benchmark-columns=min,median,max,rounds --benchmark-timer=time.process_time

Runs are saved under .benchmarks/ and compared with the last saved run, so a regression
shows as a ratio in the table; within a group, fusedrl / peer is the ratio the targets of
bench/NOTES.md are stated in. Not part of `pytest tests` (testpaths), and no assertion is
on time: each case first checks that fusedrl and its peer agree, then times both.

Groups (fp32, CPU):
- logprobs-fwd / logprobs-full: `linear_logprobs` vs eager `log_softmax(h @ W.T).gather`,
  N = 512, H = 896, V = 32768 (machine threads);
- attention-demo: `varlen_attention` (batched CPU path) vs the per-document SDPA loop, the
  demo's model (Hq = 4, Hkv = 2, D = 32), ~1400 tokens of 4-40-token documents, forward +
  backward, one thread;
- partition-100k: the C++ balanced partition vs the pure-Python twin, 100k lengths, k = 8;
  partition-1m: C++ alone at 1M (its growth from 100k is the O(n log n) check);
- policy-loss-64k-full / -fwd, kl-k3-64k-full, grpo-advantages-4096: `policy_loss` (GRPO, k3 KL
  beta 0.04, clip 0.2, token_mean, N = 65536 packed over 64 sequences), `kl_penalty` k3 and
  `grpo_advantages` (4096 groups of 16) beside the same formula in plain PyTorch, one thread
  (the cases of `python -m fusedrl.bench.bench_objectives --device cpu`, which adds memory).
"""
import random

import numpy as np
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fusedrl import packing  # noqa: E402
from fusedrl.kernels import linear_logprobs, varlen_attention  # noqa: E402
from fusedrl.kernels.reference import varlen_attention_reference  # noqa: E402

ROUNDS = 3


def _pedantic(benchmark, fn, rounds=ROUNDS):
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def lp_inputs():
    gen = torch.Generator().manual_seed(0)
    n, hdim, vocab = 512, 896, 32768
    hidden = torch.randn(n, hdim, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hdim, generator=gen) / hdim ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return hidden, weight, labels, torch.randn(n, generator=gen)


def _eager_logprobs(hidden, weight, labels):
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, labels[:, None])[:, 0]


LP_IMPLS = {"fusedrl": lambda h, w, y: linear_logprobs(h, w, y), "eager": _eager_logprobs}


@pytest.mark.parametrize("impl", list(LP_IMPLS))
def test_logprobs_forward(benchmark, lp_inputs, impl):
    benchmark.group = "logprobs-fwd"
    hidden, weight, labels, _ = lp_inputs
    with torch.no_grad():
        torch.testing.assert_close(LP_IMPLS[impl](hidden, weight, labels), _eager_logprobs(hidden, weight, labels),
                                   rtol=1e-4, atol=1e-4)

        _pedantic(benchmark, lambda: LP_IMPLS[impl](hidden, weight, labels))


@pytest.mark.parametrize("impl", list(LP_IMPLS))
def test_logprobs_full(benchmark, lp_inputs, impl):
    benchmark.group = "logprobs-full"
    hidden, weight, labels, grad = lp_inputs

    def step():
        hidden.grad = weight.grad = None
        LP_IMPLS[impl](hidden, weight, labels).backward(grad)

    _pedantic(benchmark, step)


@pytest.fixture(scope="module")
def attn_inputs():
    rnd, lengths = random.Random(0), []
    while sum(lengths) < 1400:
        lengths.append(rnd.randint(4, 40))
    total = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(total, 4, 32, generator=gen).requires_grad_()
    k, v = (torch.randn(total, 2, 32, generator=gen).requires_grad_() for _ in range(2))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return q, k, v, cu, max(lengths), torch.randn(total, 4, 32, generator=gen)


ATTN_IMPLS = {"fusedrl": varlen_attention, "per-document-loop": varlen_attention_reference}


@pytest.mark.parametrize("impl", list(ATTN_IMPLS))
def test_attention_demo_shapes(benchmark, attn_inputs, impl):
    benchmark.group = "attention-demo"
    q, k, v, cu, max_len, grad = attn_inputs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs
    try:
        torch.testing.assert_close(ATTN_IMPLS[impl](q, k, v, cu, max_len), varlen_attention_reference(q, k, v, cu, max_len),
                                   rtol=1e-4, atol=3e-5)
        _pedantic(benchmark, lambda: torch.autograd.grad(ATTN_IMPLS[impl](q, k, v, cu, max_len), (q, k, v), grad),
                  rounds=10)
    finally:
        torch.set_num_threads(threads)


def _lengths(n):
    return np.random.default_rng(0).integers(16, 4097, n).astype(np.int64)


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_partition_100k(benchmark, backend):
    if backend == "cpp" and packing._C is None:
        pytest.skip("the C++ extension fusedrl._C is not built")
    benchmark.group = "partition-100k"
    lengths = _lengths(100_000)
    out = _pedantic(benchmark, lambda: packing.balanced_partition(lengths, 8, b=1 / 4096, backend=backend), rounds=2)
    assert sorted(i for g in out for i in g) == list(range(100_000))


@pytest.mark.parametrize("n", [10_000, 100_000, 1_000_000])
def test_partition_cpp_scaling(benchmark, n):
    if packing._C is None:
        pytest.skip("the C++ extension fusedrl._C is not built")
    benchmark.group = "partition-cpp-scaling"
    lengths = _lengths(n)
    _pedantic(benchmark, lambda: packing.balanced_partition(lengths, 8, b=1 / 4096, backend="cpp"), rounds=5)


# --- the RL objectives (fusedrl.bench.bench_objectives' cases, one thread): fusedrl beside the plain-PyTorch formula
OBJECTIVE_CASES = {  # group: (case id, mode)
    "policy-loss-64k-full": ("PL-CPU-64k", "full"),
    "policy-loss-64k-fwd": ("PL-CPU-64k", "forward"),
    "kl-k3-64k-full": ("KL-CPU-64k", "full"),
    "grpo-advantages-4096": ("ADV-CPU-4096", "forward"),
}


@pytest.mark.parametrize("impl", ["fusedrl", "torch-peer"])
@pytest.mark.parametrize("group", list(OBJECTIVE_CASES))
def test_objectives(benchmark, group, impl):
    from fusedrl.bench import bench_objectives as bo
    from fusedrl.bench.common import Provider, _mode_fn

    benchmark.group = group
    case_id, mode = OBJECTIVE_CASES[group]
    make, ours, peer, _ = bo.SPECS[case_id]
    inputs = make(*bo.CASES[case_id])
    torch.testing.assert_close(ours(inputs).detach(), peer(inputs).detach(), rtol=1e-4, atol=1e-6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = _mode_fn(Provider(impl, ours if impl == "fusedrl" else peer), inputs, mode)
        _pedantic(benchmark, run, rounds=20)
    finally:
        torch.set_num_threads(threads)
