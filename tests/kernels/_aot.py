"""Compile Triton kernels' real GPU path ahead of time (Triton -> PTX -> ptxas cubin), no GPU needed.

CPU tests run the kernels under Triton's interpreter, which never compiles the GPU
branches (`INTERPRET`/`UPCAST` flags, autotune configs, tl.dot precisions). The
*_compile tests use this module to compile them for sm_90 / sm_80 instead.

Two halves:
- `run_aot(script, payload, tmp_path)` (in the pytest process): runs `script` in a fresh
  Python without TRITON_INTERPRET (`triton.jit` picks interpreter or compiler when a
  kernel module is imported, and conftest sets the interpreter for this process),
  with a private Triton cache, and returns the JSON the script prints last.
- `compile_kernel(...)` (inside that script, `from _aot import compile_kernel`): one
  `triton.compile` of a @triton.jit function for a `GPUTarget("cuda", arch, 32)`,
  summarised as shared-memory bytes, cubin size and which tensor-core instruction
  the PTX uses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# shared memory one block may use (opt-in maximum) per architecture, bytes
SMEM_LIMIT = {"90": 232448, "80": 166912}

# torch dtype name -> Triton signature type
TYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "int32": "i32", "int64": "i64"}


def attention_types(fn, consts: dict, dtype_name: str, int_pointers: dict) -> dict:
    """`types` of an attention kernel: `int_pointers` ({name: "*i32" | "*i64"}) as given, LSE / DELTA
    float32 pointers, qk_scale / scale float32, every other upper-case runtime argument a pointer to
    `dtype_name` (the q / k / v / o tensors and their gradients); lower-case ones stay i32 scalars."""
    types = {}
    for arg in fn.arg_names:
        if arg in int_pointers:
            types[arg] = int_pointers[arg]
        elif arg in ("LSE", "DELTA"):
            types[arg] = "*fp32"
        elif arg in ("qk_scale", "scale"):
            types[arg] = "fp32"
        elif arg.isupper() and arg not in consts:
            types[arg] = "*" + dtype_name
    return types


def compile_kernel(fn, types: dict, consts: dict, arch: str, num_warps: int = 4, num_stages: int = 3,
                   aligned=()) -> dict:
    """Compile one kernel for sm_<arch>; runs inside the `run_aot` subprocess.

    Args:
        fn: a @triton.jit function (an autotuned kernel's `.fn`).
        types: Triton types ("*bf16", "fp32", "i64", ...) of runtime arguments; any argument
            missing from `types` and `consts` is an "i32" scalar.
        consts: values of the constexpr arguments.
        arch: "90" or "80"; num_warps, num_stages: the launch configuration.
        aligned: integer arguments the launch sees as multiples of 16 (strides of H = 4096 rows...).
            Every pointer counts as 16-byte aligned, as torch allocations are: with these hints
            Triton vectorises loads and pipelines them through shared memory as on a real launch
            (integer arguments equal to 1, e.g. unit strides, belong in `consts`, as Triton
            specialises them).
    Returns:
        {"shared": bytes of shared memory, "cubin_bytes": int, "mma": "wgmma" | "mma" | ""}.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    unknown = set(types) | set(consts) | set(aligned)
    unknown -= set(fn.arg_names)
    if unknown:  # a renamed kernel argument must fail loudly, not compile a stale signature
        raise KeyError(f"{fn.__name__} has no arguments {sorted(unknown)}; it takes {fn.arg_names}")
    signature = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    hinted = [a for a in fn.arg_names if signature[a].startswith("*") or a in aligned]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in hinted}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", int(arch), 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else ""
    return {"shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"]), "mma": mma}


def run_aot(script: str, payload, tmp_path, timeout: int = 300) -> dict:
    """Run `script` (argv[1] = json of `payload`) in a compiler-mode subprocess; its last stdout line, parsed.

    Skips the test when ptxas is unavailable; fails with the subprocess's stderr otherwise.
    """
    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, ROOT, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", script, json.dumps(payload)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("ptxas is not available to compile ahead of time")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_fits(report: dict, arch: str, name: str, *, uses_shared: bool = True) -> None:
    """A compiled kernel produced a cubin and its shared memory fits one block on sm_<arch>."""
    info = report[name]
    assert info["cubin_bytes"] > 0, name
    low = 1 if uses_shared else 0
    assert low <= info["shared"] <= SMEM_LIMIT[arch], f"{name} needs {info['shared']} B of shared memory on sm_{arch}"
