"""The Triton path of `invariant_rms_norm` (`_invariant_norm_triton.py`): HF's RMSNorm against a float64
oracle forward and backward, and a row's output and gradient w.r.t. its input bitwise the same whatever
the number of rows, the row's offset or its neighbours (one program per row, reduction order fixed by
the width). On CPU the kernels run under the interpreter (`_invariant_rms_norm_triton`); the `gpu`
cases run `invariant_rms_norm`'s own dispatch on CUDA."""
import pytest
import torch

from fusedrl.kernels._dispatch import force_backend
from fusedrl.kernels.invariant import (TRITON_NORM_MAX_WIDTH, _invariant_rms_norm_triton, _triton_norm_fits,
                                       invariant_rms_norm)

from ..conftest import assert_close, tolerance

CUDA = pytest.mark.gpu  # skipped without a CUDA device (conftest); bench/gpu_check.sh runs `-m gpu`
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
EPS = 1e-6
# (x dtype, weight dtype): HF keeps the weight in the model dtype; a float32 weight promotes the output
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32)]


def _norm(x, w):
    """The Triton path: `invariant_rms_norm` itself on CUDA (it must pick the kernels), forced on CPU."""
    if x.is_cuda:
        assert _triton_norm_fits(x.reshape(-1, x.shape[-1]), w)
        return invariant_rms_norm(x, w, EPS)
    return _invariant_rms_norm_triton(x, w, EPS)


def _inputs(rows, width, dtypes, device="cpu", seed=0):
    """(x, weight, upstream g) with x of scale 3 and weight near 1."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=gen) * 3).to(device, dtypes[0])
    w = (1 + 0.2 * torch.randn(width, generator=gen)).to(device, dtypes[1])
    g = torch.randn(rows, width, generator=gen).to(device, torch.promote_types(*dtypes))
    return x, w, g


def _run(x, w, g):
    """(y, dx, dw) of the Triton path."""
    x, w = (t.detach().clone().requires_grad_() for t in (x, w))
    y = _norm(x, w)
    return (y.detach(), *torch.autograd.grad(y, (x, w), g))


def _oracle(x, w, g):
    """(y, dx, dw) of HF's formula in float64 (no intermediate rounding)."""
    x, w = (t.detach().double().requires_grad_() for t in (x, w))
    y = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))
    return (y.detach(), *torch.autograd.grad(y, (x, w), g.double()))


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 24), (7, 70), (33, 96), (100, 40)])
def test_forward_and_backward_match_a_float64_oracle(rows, width, dtypes):
    x, w, g = _inputs(rows, width, dtypes, seed=rows + width)
    got, want = _run(x, w, g), _oracle(x, w, g)
    out_dtype = torch.promote_types(*dtypes)
    for name, a, e, dtype in zip(("y", "dx", "dw"), got, want, (out_dtype, dtypes[0], dtypes[1])):
        assert a.dtype == dtype, name
        # every output goes through n rounded to x's dtype; dx also through dn = dy * w rounded (autograd's);
        # dw sums `rows` products rounded to the dtype (plain torch), so its error grows like sqrt(rows)
        atol, rtol = tolerance(dtypes[0])
        scale = {"y": 1, "dx": 2, "dw": max(1.0, rows ** 0.5)}[name] if dtypes[0] != torch.float32 else 1
        assert_close(a, e, atol=atol * scale, rtol=rtol * scale, name=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", DTYPES[:3])
def test_rows_bitwise_independent_of_row_count_offset_and_neighbours(dtypes, device):
    x, w, g = _inputs(150, 70, dtypes, device, seed=7)
    y, dx, _ = _run(x, w, g)
    other_x, _, other_g = _inputs(40, 70, dtypes, device, seed=8)
    for start, size in [(0, 1), (5, 3), (63, 2), (100, 50), (149, 1)]:
        rows = slice(start, start + size)
        y_alone, dx_alone, _ = _run(x[rows], w, g[rows])
        assert torch.equal(y_alone, y[rows]) and torch.equal(dx_alone, dx[rows]), ("alone", start, size)
        mixed_x, mixed_g = (torch.cat([o[:37], t[rows], o[37:]]) for o, t in ((other_x, x), (other_g, g)))
        y_mixed, dx_mixed, _ = _run(mixed_x, w, mixed_g)
        inner = slice(37, 37 + size)
        assert torch.equal(y_mixed[inner], y[rows]) and torch.equal(dx_mixed[inner], dx[rows]), ("mixed", start, size)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    x, w, _ = _inputs(5, 24, DTYPES[0])
    cases = [(x.double(), w, "x"), (x[None], w, "x"), (x, w[:20], "weight"), (x, w.double(), "weight"),
             (torch.zeros(2, TRITON_NORM_MAX_WIDTH + 1), torch.ones(TRITON_NORM_MAX_WIDTH + 1), "x")]
    for xi, wi, name in cases:
        with pytest.raises(ValueError, match=f"^{name}"):
            _invariant_rms_norm_triton(xi, wi, EPS)


def test_dispatch_keeps_the_cpu_path():
    x, w, _ = _inputs(5, 24, DTYPES[0])
    assert not _triton_norm_fits(x, w)
    with force_backend("triton"):
        assert not _triton_norm_fits(x, w)


@CUDA
@pytest.mark.parametrize("dtypes", DTYPES)
def test_cuda_large_call_rows_match_single_rows_and_reference_is_off(dtypes):
    """A training-sized call (4096 rows, width 1024) against single rows, bitwise, y and dx; with the
    backend forced to "reference" the NORM_CHUNK torch path runs instead."""
    x, w, g = _inputs(4096, 1024, dtypes, "cuda", seed=9)
    y, dx, _ = _run(x, w, g)
    for row in (0, 1, 1023, 1024, 4095):
        y1, dx1, _ = _run(x[row:row + 1], w, g[row:row + 1])
        assert torch.equal(y1, y[row:row + 1]) and torch.equal(dx1, dx[row:row + 1]), row
    with force_backend("reference"):
        assert not _triton_norm_fits(x, w)
