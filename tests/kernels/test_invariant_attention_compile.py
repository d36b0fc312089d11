"""The GPU path of the invariant-attention kernels (`_invariant_attention_triton.py`) compiles
(Triton -> PTX -> ptxas cubin) for sm_90 / sm_80 without a GPU, with the fixed 32 x 64 tiles and the
launcher's own warps / stages (`_configs`), and fits shared memory. The CPU tests run only the
interpreter branches; this compiles the real ones (tests/kernels/_aot.py)."""
import pytest

from ._aot import check_fits, run_aot

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import torch
from _aot import attention_types, compile_kernel
import fusedrl.kernels._invariant_attention_triton as K

INT32 = ("TILE_SEQ", "TILE_INDEX", "BLOCK_SEQ", "BLOCK_INDEX", "CU_Q", "CU_K", "STARTS")
report = {}
for arch, dtype_name, head_dim, group in json.loads(sys.argv[1]):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    block_d = K._block_d(head_dim)
    cfg = K._configs(block_d, dtype)
    kernels = {"fwd": K._attention_fwd_kernel, "fwd_paged": K._attention_fwd_kernel,
               "dq": K._attention_bwd_dq_kernel, "dkdv": K._attention_bwd_dkdv_kernel}
    for name, fn in kernels.items():
        warps, stages = cfg[name.split("_")[0]]
        consts = K._launch_args(block_d, dtype, group)
        consts["INTERPRET"] = False
        if name.startswith("fwd"):  # the engine's in-place cache read (int64 slots) and the plain one
            consts["PAGED"] = name == "fwd_paged"
        ints = dict.fromkeys(INT32, "*i32")
        if "PAGED" in consts:
            ints["KEY_ROWS"] = "*i64" if consts["PAGED"] else "*i32"
        types = attention_types(fn, consts, dtype_name, ints)
        report[f"sm_{arch} {dtype_name} {head_dim} {name}"] = compile_kernel(fn, types, consts, arch, warps, stages)
print(json.dumps(report))
"""

# (arch, dtype, head dim, GQA group)
TARGETS = [("90", "bf16", 128, 4), ("80", "fp16", 64, 1), ("90", "fp32", 128, 2), ("90", "bf16", 256, 8)]


def test_invariant_attention_kernels_compile_ahead_of_time(tmp_path):
    report = run_aot(SCRIPT, [list(t) for t in TARGETS], tmp_path)
    for arch, dtype, dim, _ in TARGETS:
        for name in ("fwd", "fwd_paged", "dq", "dkdv"):
            check_fits(report, arch, f"sm_{arch} {dtype} {dim} {name}", uses_shared=False)
            assert report[f"sm_{arch} {dtype} {dim} {name}"]["mma"], (arch, dtype, dim, name)
