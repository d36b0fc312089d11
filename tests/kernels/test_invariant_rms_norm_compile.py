"""The GPU path of the invariant RMSNorm (`_invariant_norm_triton.py`) compiles for sm_90 / sm_80
without a GPU, with the launcher's own BLOCK / num_warps (`_config`, fixed by the width), forward and
backward. The CPU tests run the kernels under the interpreter only (tests/kernels/_aot.py)."""
import pytest

from ._aot import check_fits, run_aot

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
from _aot import compile_kernel
import fusedrl.kernels._invariant_norm_triton as K

report = {}
for arch, x_type, w_type, width in json.loads(sys.argv[1]):
    cfg = K._config(width)
    warps = cfg.pop("num_warps")
    y_type = "fp32" if "fp32" in (x_type, w_type) else x_type
    fwd = {"X": "*" + x_type, "W": "*" + w_type, "Y": "*" + y_type, "RSTD": "*fp32", "eps": "fp32"}
    bwd = {"X": "*" + x_type, "W": "*" + w_type, "DY": "*" + y_type, "RSTD": "*fp32", "DX": "*" + x_type}
    for name, fn, types, strides in (("fwd", K._rms_fwd_kernel, fwd, ("stride_x", "stride_y")),
                                     ("bwd", K._rms_bwd_kernel, bwd, ("stride_x", "stride_dy", "stride_dx"))):
        report[f"sm_{arch} {x_type} {w_type} {width} {name}"] = compile_kernel(
            fn, types, dict(cfg), arch, warps, 1, aligned=("H",) + strides)
print(json.dumps(report))
"""

# (arch, x dtype, weight dtype, width): a Qwen-7B hidden width, a head dim (q/k norm), a float32 weight
TARGETS = [("90", "bf16", "bf16", 3584), ("80", "fp16", "fp16", 128), ("90", "bf16", "fp32", 4096),
           ("90", "fp32", "fp32", 8192)]


def test_invariant_rms_norm_kernels_compile_ahead_of_time(tmp_path):
    report = run_aot(SCRIPT, [list(t) for t in TARGETS], tmp_path)
    for arch, x_type, w_type, width in TARGETS:
        for name in ("fwd", "bwd"):
            check_fits(report, arch, f"sm_{arch} {x_type} {w_type} {width} {name}", uses_shared=False)
