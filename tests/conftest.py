"""Shared test harness: seeds, per-dtype tolerances, an informative assert, the gpu marker.

Without a GPU, Triton kernels run under Triton's interpreter: TRITON_INTERPRET=1
must be set before Triton is first imported, so it is set here, at collection.
"""
import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# (atol, rtol) for comparing an op's output in a dtype against a float64/float32 oracle.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype):
    """(atol, rtol) for `dtype`."""
    return TOLERANCES[dtype]


def assert_close(actual, expected, *, atol=None, rtol=None, dtype=None, name="tensor"):
    """Like torch.testing.assert_close, but reports max/mean abs error and the first bad index."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if atol is None or rtol is None:
        d_atol, d_rtol = tolerance(dtype or actual.dtype)
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())
    bad |= torch.isnan(a) != torch.isnan(e)
    if bad.any():
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs err {float(torch.nan_to_num(err, nan=float('inf')).max()):.3e}, "
            f"mean abs err {float(torch.nan_to_num(err, nan=0.0).mean()):.3e}; "
            f"first mismatch at {first}: got {float(a[first]):.8g}, expected {float(e[first]):.8g}"
        )


@pytest.fixture
def seed():
    """Seed python, numpy and torch; returns the seed."""
    value = 1234
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


# Files whose every test is `slow` (left out of `make test-fast`): the ahead-of-time compiles of the
# kernels and the full demo. Marked here so the kernel test files stay as their owners wrote them.
SLOW_FILES = ("test_attention_compile.py", "test_logprobs_compile.py", "test_objectives_compile.py", "test_demo.py")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if item.path.name in SLOW_FILES or item.path.name.endswith("_compile.py"):
            item.add_marker(pytest.mark.slow)
