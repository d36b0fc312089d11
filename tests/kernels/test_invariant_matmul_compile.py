"""The GPU path of the invariant matmul (`_invariant_matmul_triton.py`) compiles (Triton -> PTX ->
ptxas cubin) for sm_90 / sm_80 without a GPU, with the launcher's own fixed tiles, warps and stages
(`_config`), M not specialised, and fits shared memory: the forward (y = x W^T + bias, W read
transposed) and the dx pass (dy W, W read as stored). 16-bit inputs must use tensor cores; float32 runs
ieee FMA (no TF32), so no MMA there. The CPU tests run only the interpreter branch; this compiles the
real one (tests/kernels/_aot.py)."""
import pytest

from ._aot import check_fits, run_aot

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import torch
from _aot import compile_kernel
import fusedrl.kernels._invariant_matmul_triton as K

report = {}
for arch, dtype_name, k, n in json.loads(sys.argv[1]):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    cfg = dict(K._config(dtype))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    # (name, unit stride of B, strides that are model constants (multiples of 16)): the forward reads
    # W (N, K) as B (K, N) with stride_bk = 1; the dx pass reads W as B (N, K) with stride_bn = 1
    for name, unit in (("fwd", "stride_bk"), ("dx", "stride_bn")):
        consts = dict(cfg, HAS_BIAS=name == "fwd", GROUP=K.GROUP_M, PRECISION="ieee", INTERPRET=False,
                      stride_ak=1, stride_yn=1, **{unit: 1})
        types = {a: "*" + dtype_name for a in ("A", "B", "BIAS", "Y")}
        aligned = [a for a in ("N", "K", "stride_am", "stride_bk", "stride_bn", "stride_ym") if a not in consts]
        report[f"sm_{arch} {dtype_name} {name}"] = compile_kernel(K._matmul_kernel, types, consts, arch, warps,
                                                                  stages, aligned=aligned)
print(json.dumps(report))
"""

# (arch, dtype, K, N): model constants only matter through the alignment hints
TARGETS = [("90", "bf16", 4096, 4096), ("80", "fp16", 4096, 4096), ("90", "fp32", 1024, 1024), ("80", "bf16", 4096, 4096)]


def test_invariant_matmul_kernel_compiles_ahead_of_time(tmp_path):
    report = run_aot(SCRIPT, [list(t) for t in TARGETS], tmp_path)
    for arch, dtype, _, _ in TARGETS:
        for name in ("fwd", "dx"):
            key = f"sm_{arch} {dtype} {name}"
            check_fits(report, arch, key)
            if dtype != "fp32":
                assert report[key]["mma"] == ("wgmma" if arch == "90" else "mma"), (key, report[key])
