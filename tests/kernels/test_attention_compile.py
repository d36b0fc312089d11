"""The GPU code path of the attention kernels compiles (Triton -> PTX -> ptxas cubin) without a GPU.

CPU tests run the kernels under the interpreter, which executes only the interpreter
branches (`INTERPRET=True`); this test compiles the real GPU branches ahead of time for
sm_90 and sm_80 with the launcher's own block configuration, so a compile error or a tile
that overflows shared memory is caught before a GPU run. It runs in a subprocess because
`triton.jit` picks interpreter or compiler when the module is imported.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fusedrl.kernels._attention_triton as K

floats = {"qk_scale": "fp32", "scale": "fp32"}
fp32_ptrs = {"LSE", "DELTA"}
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
        signature = {}
        for arg in fn.arg_names:
            if arg in consts:
                signature[arg] = "constexpr"
            elif arg == "CU_SEQLENS":
                signature[arg] = "*i32"
            elif arg in fp32_ptrs:
                signature[arg] = "*fp32"
            elif arg.isupper():
                signature[arg] = "*" + dtype_name
            else:
                signature[arg] = floats.get(arg, "i32")
        source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", int(arch), 32),
                                  options={"num_warps": warps, "num_stages": stages})
        report[f"sm_{arch} {name}"] = {"shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"])}
print(json.dumps(report))
"""

# (arch, dtype, head dim, shared-memory bytes per block on that arch)
TARGETS = [("90", "bf16", 128, 232448), ("80", "fp16", 64, 166912)]


def test_gpu_kernels_compile_ahead_of_time(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    targets = json.dumps([[arch, dtype, head_dim] for arch, dtype, head_dim, _ in TARGETS])
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, targets], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("ptxas is not available to compile ahead of time")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for arch, _, _, smem_limit in TARGETS:
        for name in ("fwd", "dkdv", "dq"):
            info = report[f"sm_{arch} {name}"]
            assert info["cubin_bytes"] > 0, name
            assert 0 < info["shared"] <= smem_limit, f"{name} needs {info['shared']} B of shared memory on sm_{arch}"
