"""The GPU path of the split-KV decode kernels compiles (Triton -> PTX -> ptxas) for sm_90 / sm_80 without a GPU."""
import pytest

from ._aot import check_fits, run_aot

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
from _aot import compile_kernel
import fusedrl.kernels._decode_attention_triton as K

report = {}
for arch, dtype_name, head_dim, page, group in json.loads(sys.argv[1]):
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    split = dict(GROUP=group, PAGE=page, HEAD_DIM=head_dim, BLOCK_N=K.block_n(page), BLOCK_D=block_d)
    types = {"Q": "*" + dtype_name, "K": "*" + dtype_name, "V": "*" + dtype_name, "BLOCK_TABLES": "*i32",
             "CONTEXT_LENS": "*i32", "O_PART": "*fp32", "LSE_PART": "*fp32", "scale": "fp32"}
    report[f"sm_{arch} split"] = compile_kernel(K._paged_decode_split_kernel, types, split, arch, 4, 1)
    combine = dict(HEAD_DIM=head_dim, BLOCK_S=8, BLOCK_D=block_d)
    types = {"O_PART": "*fp32", "LSE_PART": "*fp32", "OUT": "*" + dtype_name}
    report[f"sm_{arch} combine"] = compile_kernel(K._paged_decode_combine_kernel, types, combine, arch, 4, 1)
print(json.dumps(report))
"""

TARGETS = [("90", "bf16", 64, 16, 7), ("80", "fp16", 128, 256, 4)]


def test_decode_kernels_compile_ahead_of_time(tmp_path):
    report = run_aot(SCRIPT, [list(t) for t in TARGETS], tmp_path)
    for arch, *_ in TARGETS:
        for name in ("split", "combine"):
            check_fits(report, arch, f"sm_{arch} {name}", uses_shared=False)
