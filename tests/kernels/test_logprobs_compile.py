"""The GPU path of the log-prob kernels compiles for sm_90 / sm_80 without a GPU (see tests/kernels/_aot.py).

Covers every launched kernel of `_logprobs_triton` (hidden-state path: forward tiles, the
log-sum-exp combine, the backward d(logits) tiles and the dh accumulation matmul) with the
autotune configs that survive the launcher's own shared-memory pruning, and both kernels of
`_logits_logprobs_triton` with the fixed tile the launcher picks on CUDA. bf16 and fp32 inputs,
bias and entropy on and off, H = 4096 and 896, V = 151936 (Qwen2's vocabulary) where V is a
constexpr. A representative set, not the cartesian product: every config of a matmul kernel
with all flags on at H = 4096, and single-config compiles for the other flags, H and sm_80.
"""
import pytest

from ._aot import check_fits, run_aot

triton = pytest.importorskip("triton")

SCRIPT = r"""
import collections, json, sys
import torch, triton
from _aot import compile_kernel
import fusedrl.kernels._logprobs_triton as L
import fusedrl.kernels._logits_logprobs_triton as G

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VOCAB, TOKENS = 151936, 8192


def configs(tuner, dt, which, **kw):
    # the launcher's pruner, fed a tensor of the call's dtype for whichever argument it reads
    named = collections.defaultdict(lambda: torch.empty(0, dtype=DTYPES[dt]))
    kept = tuner.early_config_prune(tuner.configs, named, **kw)
    return kept if which == "all" else kept[:1]


def matmul_kernel(kind, arch, dt, hdim, bias, ent, prec, which, stats=False):
    # the launcher's own precision policy: fp32 follows torch's allow_tf32, bf16 always runs tensor cores
    torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
    dot = dict(DOT_PRECISION=L._dot_precision(DTYPES[dt]), UPCAST=L._upcast(DTYPES[dt]))
    prec = dot["DOT_PRECISION"]
    ptr = "*" + dt
    out = {}
    if kind == "fwd":
        tuner, extra = L._FWD, dict(BLOCK_V=L.FWD_BLOCK_V)
        types = dict(h_ptr=ptr, w_ptr=ptr, b_ptr=ptr if bias else "*fp32", labels_ptr="*i64",
                     lse_part_ptr="*fp32", pz_part_ptr="*fp32", zl_ptr="*fp32", stats_part_ptr="*fp32", inv_tau="fp32")
        consts = dict(H=hdim, HAS_BIAS=bias, ENTROPY=ent, STATS=stats, stride_hh=1, stride_wh=1, **dot, **extra)
        aligned = ("stride_hn", "stride_wv")
    elif kind == "bwd":
        tuner, extra = L._BWD, {}
        types = dict(h_ptr=ptr, w_ptr=ptr, b_ptr=ptr if bias else "*fp32", labels_ptr="*i64", lse_ptr="*fp32",
                     pz_ptr="*fp32", g_logp_ptr="*fp32", g_ent_ptr="*fp32", dz_ptr=ptr, inv_tau="fp32")
        consts = dict(H=hdim, HAS_BIAS=bias, ENTROPY=ent, stride_hh=1, stride_wh=1, **dot)
        aligned = ("stride_hn", "stride_wv", "VC")
    else:  # dh += d(logits) @ W[chunk]; K_CHUNK as the launcher sizes the d(logits) chunk for TOKENS rows
        tuner, extra = L._ACC, {}
        vc = L._VC_ALIGN << max(0, (L.DZ_BYTES // (TOKENS * DTYPES[dt].itemsize * L._VC_ALIGN)).bit_length() - 1)
        types = dict(acc_ptr="*fp32", a_ptr=ptr, b_ptr=ptr)
        consts = dict(K_CHUNK=min(VOCAB, vc), stride_bn=1, **dot)
        aligned = ("K", "K2", "stride_bk")
    for cfg in configs(tuner, dt, which, **extra):
        name = f"sm_{arch} {kind} {dt} H={hdim} bias={bias} ent={ent} {prec} " + \
            " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" w={cfg.num_warps} s={cfg.num_stages}" + \
            (" stats" if stats else "")
        out[name] = compile_kernel(tuner.fn, types, {**consts, **cfg.kwargs}, arch, cfg.num_warps, cfg.num_stages,
                                   aligned)
    return out


def combine_kernel(arch, ent, stats=False):
    meta = dict(L._COMBINE_META)
    warps = meta.pop("num_warps")
    types = {a: "*i64" if a == "labels_ptr" else "*fp32" for a in L._lse_combine_kernel.arg_names if a.endswith("_ptr")}
    types["top1_ptr"] = "*i8"
    consts = dict(P=triton.cdiv(VOCAB, L.FWD_BLOCK_V), ENTROPY=ent, STATS=stats, **meta)
    name = f"sm_{arch} combine ent={ent} stats={stats}"
    return {name: compile_kernel(L._lse_combine_kernel, types, consts, arch, warps)}


def logits_kernel(kind, arch, dt, vocab, ent):
    fn = G._logits_logprobs_fwd_kernel if kind == "logits_fwd" else G._logits_logprobs_bwd_kernel
    meta = dict(G._META)
    warps = meta.pop("num_warps")
    types = {a: "*fp32" for a in fn.arg_names if a.endswith("_ptr")}
    types.update(logits_ptr="*" + dt, labels_ptr="*i64", inv_tau="fp32")
    if kind == "logits_bwd":
        types["dlogits_ptr"] = "*" + dt
    consts = dict(V=vocab, ENTROPY=ent, stride_v=1, BLOCK_V=min(meta["BLOCK_V"], triton.next_power_of_2(vocab)))
    name = f"sm_{arch} {kind} {dt} V={vocab} ent={ent}"
    return {name: compile_kernel(fn, types, consts, arch, warps, aligned=("stride_n",) if vocab % 16 == 0 else ())}


report = {}
for case in json.loads(sys.argv[1]):
    kind, arch = case[0], case[1]
    if kind in ("fwd", "bwd", "acc"):
        report.update(matmul_kernel(*case))
    elif kind == "combine":
        report.update(combine_kernel(arch, *case[2:]))
    else:
        report.update(logits_kernel(*case))
print(json.dumps(report))
"""

# (kernel, arch, dtype, H, bias, entropy, tl.dot precision, "all" pruned configs | "first")
MATMUL_CASES = [
    (kind, "90", dt, 4096, True, True, prec, "all")
    for kind in ("fwd", "bwd", "acc") for dt, prec in (("bf16", "tf32"), ("fp32", "ieee"))
] + [
    (kind, "90", "fp32", 4096, True, True, "tf32", "all") for kind in ("fwd", "bwd")  # tf32 tiles: the largest
] + [
    ("fwd", "90", "bf16", 896, False, False, "tf32", "first"),
    ("fwd", "90", "bf16", 4096, False, True, "tf32", "first", True),  # DPO's logit statistics in the same pass
    ("fwd", "90", "fp32", 896, True, False, "tf32", "first"),  # fp32 under allow_tf32
    ("bwd", "90", "bf16", 896, False, True, "tf32", "first"),
    ("bwd", "90", "fp32", 896, True, False, "tf32", "first"),
    ("acc", "90", "bf16", 896, False, False, "tf32", "first"),
    ("fwd", "80", "bf16", 4096, True, True, "tf32", "first"),
    ("bwd", "80", "bf16", 896, False, True, "tf32", "first"),
    ("acc", "80", "fp32", 896, False, False, "ieee", "first"),
]
OTHER_CASES = [
    ("combine", "90", True), ("combine", "90", False), ("combine", "80", True), ("combine", "90", False, True),
    ("logits_fwd", "90", "bf16", 151936, True), ("logits_fwd", "90", "fp32", 151936, False),
    ("logits_fwd", "90", "bf16", 1000, False),
    ("logits_bwd", "90", "bf16", 151936, True), ("logits_bwd", "90", "fp32", 151936, False),
    ("logits_fwd", "80", "bf16", 151936, True), ("logits_bwd", "80", "fp32", 151936, True),
]


def test_logprob_kernels_compile_ahead_of_time(tmp_path):
    report = run_aot(SCRIPT, MATMUL_CASES + OTHER_CASES, tmp_path, timeout=600)
    for kind, arch, dt, hdim, bias, ent, prec, which, *_stats in MATMUL_CASES:
        prefix = f"sm_{arch} {kind} {dt} H={hdim} bias={bias} ent={ent} {prec} "
        names = [n for n in report if n.startswith(prefix)]
        assert names, prefix  # at least one config survives pruning
        for name in names:
            check_fits(report, arch, name)
            if dt == "bf16" or prec == "tf32":  # tensor cores, wgmma on Hopper
                assert report[name]["mma"] == ("wgmma" if arch == "90" else "mma"), (name, report[name]["mma"])
    for case in OTHER_CASES:
        matches = [n for n in report if n.startswith(f"sm_{case[1]} {case[0]}")]
        assert matches, case
        for name in matches:  # the logits backward is elementwise: no reduction, no shared memory
            check_fits(report, case[1], name, uses_shared=case[0] != "logits_bwd")
    assert len(report) == len(set(report))
