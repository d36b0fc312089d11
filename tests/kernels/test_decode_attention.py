"""paged_decode_attention: the torch path and the split-KV Triton kernel (interpreter) vs a float64 oracle."""
import pytest
import torch

from fusedrl.kernels import force_backend
from fusedrl.kernels.decode_attention import default_num_splits, paged_decode_attention

from ..conftest import assert_close

triton = pytest.importorskip("triton")


def oracle(q, k_cache, v_cache, tables, lens, scale):
    """Per sequence, per head: gather positions one by one, softmax in float64."""
    batch, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(batch, hq, d, dtype=torch.float64)
    for b in range(batch):
        n = int(lens[b])
        idx = [(int(tables[b, p // page]), p % page) for p in range(n)]
        keys = torch.stack([k_cache[i, j] for i, j in idx]).double()  # (n, Hkv, D)
        vals = torch.stack([v_cache[i, j] for i, j in idx]).double()
        for h in range(hq):
            kv = h // (hq // hkv)
            w = torch.softmax(scale * keys[:, kv] @ q[b, h].double(), dim=0)
            out[b, h] = w @ vals[:, kv]
    return out


def make(batch, hq, hkv, d, page, lens, num_blocks=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // page) for n in lens) + 1
    num_blocks = num_blocks or batch * width + 3
    k_cache = torch.randn(num_blocks, page, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)[: batch * width]  # scattered, non-overlapping pages
    tables = perm.view(batch, width).to(torch.int32)
    q = torch.randn(batch, hq, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


SHAPES = [  # (batch, Hq, Hkv, D, page, context lengths)
    (3, 4, 2, 24, 16, [1, 17, 40]),
    (2, 6, 1, 40, 8, [63, 9]),
    (4, 3, 3, 16, 5, [5, 6, 1, 23]),
    (1, 8, 2, 72, 32, [100]),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reference_matches_oracle(shape, dtype):
    batch, hq, hkv, d, page, lens = shape
    q, kc, vc, tables, ctx = make(batch, hq, hkv, d, page, lens, dtype=dtype)
    out = paged_decode_attention(q, kc, vc, tables, ctx, backend="reference")
    assert out.dtype == dtype
    assert_close(out, oracle(q, kc, vc, tables, ctx, d ** -0.5), dtype=dtype, name=f"reference {dtype}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_matches_oracle(shape, num_splits):
    batch, hq, hkv, d, page, lens = shape
    q, kc, vc, tables, ctx = make(batch, hq, hkv, d, page, lens, seed=1)
    out = paged_decode_attention(q, kc, vc, tables, ctx, backend="triton", num_splits=num_splits, softmax_scale=0.3)
    assert out.dtype == torch.float32
    assert_close(out, oracle(q, kc, vc, tables, ctx, 0.3), atol=2e-5, rtol=2e-5, name=f"triton splits={num_splits}")


def test_triton_half_precision_and_forced_backend():
    q, kc, vc, tables, ctx = make(2, 4, 2, 32, 16, [30, 7], dtype=torch.bfloat16, seed=2)
    with force_backend("triton"):
        out = paged_decode_attention(q, kc, vc, tables, ctx)
    assert out.dtype == torch.bfloat16
    assert_close(out, oracle(q, kc, vc, tables, ctx, 32 ** -0.5), dtype=torch.bfloat16, name="bf16")


def test_more_splits_than_keys_leave_empty_splits_harmless():
    q, kc, vc, tables, ctx = make(2, 2, 1, 16, 4, [2, 9], seed=3)
    out = paged_decode_attention(q, kc, vc, tables, ctx, backend="triton", num_splits=7)
    assert_close(out, oracle(q, kc, vc, tables, ctx, 0.25), atol=2e-5, rtol=2e-5, name="empty splits")


def test_default_num_splits_bounds():
    assert default_num_splits(1, 1, 100) == 1  # fewer than 256 keys: one split
    assert default_num_splits(1, 8, 8192) == 32
    assert default_num_splits(256, 32, 8192) == 1


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(2, 4, 8, dtype=torch.int32)), "q must have dtype"),
    (dict(context_lens=torch.tensor([0, 3], dtype=torch.int32)), "context_lens must be in"),
    (dict(context_lens=torch.tensor([3, 99], dtype=torch.int32)), "context_lens must be in"),
    (dict(block_tables=torch.full((2, 2), 50, dtype=torch.int32)), "page ids outside"),
    (dict(block_tables=torch.zeros(3, 2, dtype=torch.int32)), "rows"),
    (dict(k_cache=torch.zeros(6, 4, 3, 8)), "GQA|shape"),
    (dict(softmax_scale=-1.0), "softmax_scale"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(num_splits=0), "num_splits"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(q=torch.zeros(2, 4, 8), k_cache=torch.zeros(6, 4, 2, 8), v_cache=torch.zeros(6, 4, 2, 8),
                block_tables=torch.zeros(2, 2, dtype=torch.int32), context_lens=torch.tensor([3, 5], dtype=torch.int32))
    args.update(bad)
    if "k_cache" in bad:
        args["v_cache"] = bad["k_cache"]
    kw = {k: args.pop(k) for k in ("softmax_scale", "backend", "num_splits") if k in args}
    with pytest.raises((ValueError, TypeError), match=match):
        paged_decode_attention(*args.values(), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_triton_matches_oracle(dtype):
    q, kc, vc, tables, ctx = make(5, 14, 2, 64, 16, [1, 300, 129, 1000, 64], dtype=dtype, seed=4)
    want = oracle(q, kc, vc, tables, ctx, 0.125)
    got = paged_decode_attention(q.cuda(), kc.cuda(), vc.cuda(), tables.cuda(), ctx.cuda(), softmax_scale=0.125,
                                 backend="triton")
    assert_close(got.cpu(), want, dtype=dtype if dtype != torch.float32 else None, atol=None if dtype != torch.float32
                 else 2e-5, rtol=None if dtype != torch.float32 else 2e-5, name="cuda triton")


@pytest.mark.gpu
def test_gpu_flash_attn_agrees_when_installed():
    from fusedrl.kernels import HAS_FLASH_ATTN

    if not HAS_FLASH_ATTN:
        pytest.skip("flash_attn not installed")
    q, kc, vc, tables, ctx = make(3, 8, 2, 128, 256, [1, 700, 300], dtype=torch.bfloat16, seed=5)
    args = (q.cuda(), kc.cuda(), vc.cuda(), tables.cuda(), ctx.cuda())
    got = paged_decode_attention(*args, backend="flash_attn")
    assert_close(got.cpu(), oracle(q, kc, vc, tables, ctx, 128 ** -0.5), dtype=torch.bfloat16, name="flash_attn")


def test_forced_reference_and_auto_pick_the_torch_path_on_cpu():
    q, kc, vc, tables, ctx = make(2, 4, 2, 16, 4, [5, 9], seed=6)
    want = paged_decode_attention(q, kc, vc, tables, ctx, backend="reference")
    with force_backend("reference"):
        assert torch.equal(paged_decode_attention(q, kc, vc, tables, ctx), want)
    assert torch.equal(paged_decode_attention(q, kc, vc, tables, ctx), want)  # auto on CPU tensors
