"""The GPU code path of the attention kernels compiles (Triton -> PTX -> ptxas cubin) without a GPU.

CPU tests run the kernels under the interpreter, which executes only the interpreter
branches (`INTERPRET=True`); this test compiles the real GPU branches ahead of time for
sm_90 and sm_80 with the launcher's own block configuration, so a compile error or a tile
that overflows shared memory is caught before a GPU run. It runs in a subprocess because
`triton.jit` picks interpreter or compiler when the module is imported (tests/kernels/_aot.py).
"""
import pytest

from ._aot import check_fits, run_aot

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import torch
from _aot import attention_types, compile_kernel
import fusedrl.kernels._attention_triton as K

report = {}
for arch, dtype_name, head_dim in json.loads(sys.argv[1]):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    block_d = K._block_d(head_dim)
    cfg = K._configs(block_d, dtype, torch.device("cuda"))
    kernels = {
        "fwd": K._varlen_attention_fwd_kernel,
        "dkdv": K._varlen_attention_bwd_dkdv_kernel,
        "dq": K._varlen_attention_bwd_dq_kernel,
    }
    for name, fn in kernels.items():
        block_m, block_n, warps, stages = cfg[name]
        consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=K._precision(dtype),
                      GROUP=4, INTERPRET=False)
        types = attention_types(fn, consts, dtype_name, {"CU_SEQLENS": "*i32"})
        report[f"sm_{arch} {name}"] = compile_kernel(fn, types, consts, arch, warps, stages)
print(json.dumps(report))
"""

# (arch, dtype, head dim)
TARGETS = [("90", "bf16", 128), ("80", "fp16", 64)]


def test_gpu_kernels_compile_ahead_of_time(tmp_path):
    report = run_aot(SCRIPT, [list(t) for t in TARGETS], tmp_path)
    for arch, _, _ in TARGETS:
        for name in ("fwd", "dkdv", "dq"):
            check_fits(report, arch, f"sm_{arch} {name}")
