"""The Triton path of `invariant_linear` (`_invariant_matmul_triton.py`): accurate against a float64
oracle forward and backward, and a row's output and gradient w.r.t. its input bitwise the same whatever
the number of rows in the call, the row's offset in it, or its neighbours (by construction: one program
per output tile, K ascending in fixed steps, tiles fixed per dtype). On CPU the kernel runs under the
interpreter (`_invariant_linear_triton`); the `gpu` cases run `invariant_linear`'s own dispatch on CUDA."""
import importlib

import pytest
import torch

from fusedrl.kernels._dispatch import force_backend
from fusedrl.kernels.invariant import _invariant_linear_triton, _triton_linear_fits, invariant_linear

from ..conftest import assert_close

CUDA = pytest.mark.gpu  # skipped without a CUDA device (conftest); bench/gpu_check.sh runs `-m gpu`
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (start, size) slices of a 150-row call: single rows, tile edges of both configs (64 and 128 rows), tails
SLICES = [(0, 1), (5, 3), (63, 2), (64, 1), (100, 50), (127, 2), (1, 149), (149, 1)]


def _linear(x, w, b=None):
    """The Triton path: `invariant_linear` itself on CUDA (it must pick the kernel), the kernel on CPU."""
    if x.is_cuda:
        assert _triton_linear_fits(x.reshape(-1, x.shape[-1]), w)
        return invariant_linear(x, w, b)
    return _invariant_linear_triton(x, w, b)


def _inputs(m, k, n, dtype, device="cpu", bias=True, seed=0):
    """(x (m, k), w (n, k), b (n,) or None, upstream g (m, n)), rounded to `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    x, w, b, g = (torch.randn(*s, generator=gen) for s in ((m, k), (n, k), (n,), (m, n)))
    return tuple(None if (t is b and not bias) else t.to(device, dtype) for t in (x, w, b, g))


def _run(x, w, b, g):
    """(y, dx, dw, db) of the Triton path for upstream gradient g."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = _linear(*leaves)
    grads = torch.autograd.grad(y, leaves, g)
    return (y.detach(), *grads, *((None,) if b is None else ()))


def _oracle(x, w, b, g):
    """(y, dx, dw, db) in float64 from the (rounded) inputs."""
    x, w, g = x.double(), w.double(), g.double()
    y = x @ w.T + (0 if b is None else b.double())
    return y, g @ w, g.T @ x, None if b is None else g.sum(0)


def _check_against_oracle(x, w, b, g, dtype):
    for name, got, want in zip(("y", "dx", "dw", "db"), _run(x, w, b, g), _oracle(x, w, b, g)):
        if want is not None:
            assert got.dtype == dtype, name
            assert_close(got, want, dtype=dtype, name=name)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n", [40, 96])
@pytest.mark.parametrize("k", [24, 70])
@pytest.mark.parametrize("m", [1, 7, 33, 100])
def test_float32_forward_and_backward_match_a_float64_oracle(m, k, n, bias):
    x, w, b, g = _inputs(m, k, n, torch.float32, bias=bias, seed=m * k + n)
    _check_against_oracle(x, w, b, g, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 24, 40), (33, 70, 96), (100, 70, 40)])
def test_16bit_forward_and_backward_match_a_float64_oracle(dtype, m, k, n):
    x, w, b, g = _inputs(m, k, n, dtype, seed=m + k)
    _check_against_oracle(x, w, b, g, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_bitwise_independent_of_row_count_offset_and_neighbours(dtype, device):
    """y and dx of a row: the same bits alone, at any offset of a larger call, and next to other rows."""
    x, w, b, g = _inputs(150, 70, 96, dtype, device, seed=7)
    y, dx, _, _ = _run(x, w, b, g)
    other_x, _, _, other_g = _inputs(40, 70, 96, dtype, device, seed=8)
    for start, size in SLICES:
        rows = slice(start, start + size)
        y_alone, dx_alone, _, _ = _run(x[rows], w, b, g[rows])
        assert torch.equal(y_alone, y[rows]) and torch.equal(dx_alone, dx[rows]), ("alone", start, size)
        # the same rows after 37 other rows and before 3 more: other offset, other neighbours
        mixed = [torch.cat([o[:37], t[rows], o[37:]]) for o, t in ((other_x, x), (other_g, g))]
        y_mixed, dx_mixed, _, _ = _run(mixed[0], w, b, mixed[1])
        inner = slice(37, 37 + size)
        assert torch.equal(y_mixed[inner], y[rows]) and torch.equal(dx_mixed[inner], dx[rows]), ("mixed", start, size)


def test_empty_and_strided_inputs():
    x, w, b, _ = _inputs(12, 24, 40, torch.float32, seed=3)
    assert _invariant_linear_triton(x[:0], w, b).shape == (0, 40)
    strided = torch.randn(12, 48)[:, ::2]  # non-contiguous x: copied, same bits as its contiguous copy
    assert torch.equal(_invariant_linear_triton(strided, w), _invariant_linear_triton(strided.contiguous(), w))


def test_bad_inputs_raise_value_errors_naming_the_argument():
    x, w, b, _ = _inputs(5, 24, 40, torch.float32, seed=4)
    cases = [
        (x.double(), w.double(), None, "x"),  # dtype the kernel does not take
        (x.long(), w.long(), None, "x"),
        (x, w.half(), None, "weight"),  # dtype mismatch
        (x, w[:, :20], None, "weight"),  # K mismatch
        (x, w[0], None, "weight"),  # 1-D weight
        (x[None], w, None, "x"),  # 3-D x (invariant_linear flattens leading dims before the kernel)
        (x, w, b[:7], "bias"),
        (x, w, b.long(), "bias"),
    ]
    for xi, wi, bi, name in cases:
        with pytest.raises(ValueError, match=f"^{name}"):
            _invariant_linear_triton(xi, wi, bi)


def test_dispatch_keeps_the_cpu_path():
    """CPU tensors keep the batched-tile torch path (its bits are tests/invariant/test_primitives.py's),
    even with the Triton backend forced (the interpreter is for the tests, not for runs)."""
    x, w, _, _ = _inputs(5, 24, 40, torch.float32, seed=5)
    assert not _triton_linear_fits(x, w)
    with force_backend("triton"):
        assert not _triton_linear_fits(x, w)


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dispatch_picks_the_kernel_and_falls_back_per_tile_when_forced(dtype):
    x, w, b, _ = _inputs(150, 70, 96, dtype, "cuda", seed=6)
    assert _triton_linear_fits(x, w)
    assert torch.equal(invariant_linear(x.view(10, 15, 70), w, b).view(150, 96), _invariant_linear_triton(x, w, b))
    with force_backend("reference"):
        assert not _triton_linear_fits(x, w)
        full = invariant_linear(x, w, b)  # one F.linear per ROW_TILE rows
        for start, size in SLICES:
            assert torch.equal(invariant_linear(x[start:start + size], w, b), full[start:start + size])


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_large_m_rows_match_single_rows(dtype):
    """A training-sized call (4096 rows) against single-row (decode-like) calls, bitwise, y and dx."""
    x, w, b, g = _inputs(4096, 512, 384, dtype, "cuda", seed=9)
    y, dx, _, _ = _run(x, w, b, g)
    for row in (0, 1, 127, 128, 2049, 4095):
        y1, dx1, _, _ = _run(x[row:row + 1], w, b, g[row:row + 1])
        assert torch.equal(y1, y[row:row + 1]) and torch.equal(dx1, dx[row:row + 1]), row


def test_native_engine_sampler_equals_trainer_bitwise_on_the_triton_linears_and_norms(monkeypatch):
    """End to end with every linear and RMSNorm of the invariant decoder on the Triton kernels (forced on
    CPU): the native engine's decode / prefill calls and the trainer's packed recompute give the same
    log-prob bits (tests/invariant/test_model_layouts.py's check)."""
    from fusedrl.rollout.sampling import SamplingParams
    from tests.invariant.test_model_layouts import _sampler_vs_trainer
    from tests.rollout._tiny import tiny_model

    inv = importlib.import_module("fusedrl.kernels.invariant")  # the package's `invariant` is the function
    rows = []
    monkeypatch.setattr(inv, "_triton_linear_fits", lambda x, w: True)
    monkeypatch.setattr(inv, "_triton_norm_fits", lambda x, w: True)
    monkeypatch.setattr(inv, "_invariant_linear_triton", lambda x, *a: rows.append(x.shape[0]) or
                        _invariant_linear_triton(x, *a))
    model = tiny_model("qwen2", seed=3)
    with inv.invariant():
        sampler, trainer = _sampler_vs_trainer(model, SamplingParams(n=2, temperature=0.7, top_k=20,
                                                                     max_new_tokens=9, seed=3), torch.float32)
    assert sampler.numel() > 20 and len(set(rows)) > 3  # decode steps, prefills and the trainer's pass
    assert torch.equal(sampler, trainer), (sampler - trainer).abs().max()
