"""Profiling that ships with the package (`fusedrl profile`).

    fusedrl profile OP --shape ... --dtype ... [--device cpu|cuda] [--backward] [--trace out.json]
    fusedrl profile run CONFIG.toml --steps N [--out DIR] [--trace out.json]

`fusedrl.profile.op` times one public op against eager and the installed peers, with % of the
measured matmul and copy ceilings; `fusedrl.profile.run` profiles N real training steps of a
config (time per loop phase and a kernel table). The named ranges both read
(`fusedrl.<op>`, `fusedrl.phase.<name>`) come from `fusedrl.kernels._ranges`. Layering: this
package sits on top, beside bench (it imports bench, train and below). See docs/profiling.md.
"""
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """`fusedrl profile ARGS`: `run ...` profiles training steps, anything else profiles one op."""
    argv = list(argv or [])
    if argv and argv[0] == "run":
        from fusedrl.profile.run import main as run_main
        return run_main(argv[1:])
    from fusedrl.profile.op import main as op_main
    return op_main(argv)
