"""The GPU path of the distillation row kernel compiles for sm_90 / sm_80 without a GPU (see tests/kernels/_aot.py).

`_distill_rows_kernel` with the block size and warps its launcher uses on CUDA (`_distill_triton._META`),
at V = 151936 (Qwen2's vocabulary, a constexpr) and one odd V: every divergence MODE, with and without the
gradient pass and the biases, bf16 and fp32 logits (student and teacher dtypes may differ).
"""
import pytest

from ._aot import check_fits, run_aot

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import triton
from _aot import compile_kernel
import fusedrl.kernels._distill_triton as D

report = {}
for arch, s_dt, t_dt, vocab, mode, bias, grad in json.loads(sys.argv[1]):
    meta = dict(D._META)
    warps = meta.pop("num_warps")
    block = min(meta["BLOCK_V"], triton.next_power_of_2(vocab))
    types = dict(zs_ptr="*" + s_dt, zt_ptr="*" + t_dt, bs_ptr="*" + s_dt if bias else "*fp32",
                 bt_ptr="*" + t_dt if bias else "*fp32", coef_ptr="*fp32", div_ptr="*fp32", inv_tau="fp32",
                 beta="fp32", log_beta="fp32", log_1m_beta="fp32", stride_s="i64", stride_t="i64")
    consts = dict(V=vocab, MODE=mode, HAS_BS=bias, HAS_BT=bias, GRAD=grad, BLOCK_V=block)
    name = f"sm_{arch} {s_dt}/{t_dt} V={vocab} mode={mode} bias={bias} grad={grad}"
    report[name] = compile_kernel(D._distill_rows_kernel, types, consts, arch, warps)
print(json.dumps(report))
"""

CASES = [("90", dt, dt, 151936, mode, bias, grad) for dt in ("bf16", "fp32") for mode in (0, 1, 2)
         for bias, grad in ((False, True), (True, False))] + [
    ("90", "bf16", "fp32", 151936, 2, True, True),  # a float32 teacher beside a bf16 student
    ("90", "bf16", "bf16", 1001, 1, False, True),  # a small odd vocabulary: one partial tile
    ("80", "bf16", "bf16", 151936, 2, False, True),
    ("80", "fp32", "fp32", 151936, 0, True, True),
]


def test_distill_row_kernel_compiles_ahead_of_time(tmp_path):
    report = run_aot(SCRIPT, CASES, tmp_path, timeout=600)
    assert len(report) == len(CASES)
    for arch, s_dt, t_dt, vocab, mode, bias, grad in CASES:
        name = f"sm_{arch} {s_dt}/{t_dt} V={vocab} mode={mode} bias={bias} grad={grad}"
        check_fits(report, arch, name, uses_shared=False)  # row reductions only: no tiles staged in shared memory
        assert report[name]["mma"] == "", name  # no matmul inside: the logits come from cuBLAS
