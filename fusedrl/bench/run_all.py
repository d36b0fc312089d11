"""Run the benchmarks: every fusedrl/bench/bench_<name>.py, or the ones named with --only.

    python -m fusedrl.bench.run_all                        # every bench at its canonical shapes
    python -m fusedrl.bench.run_all --only logprobs,attention
    python -m fusedrl.bench.run_all --smoke                # tiny shapes: checks the bench code on CPU
    python -m fusedrl.bench.run_all --list                 # names, one per line
    python -m fusedrl.bench.run_all --only packing --cases k8 --n 4096   # other flags go to each bench

`fusedrl bench ARGS` calls `main(ARGS)`. It first prints the peers' installed versions (`peers: trl 1.16.0,
liger-kernel absent, ...`, fusedrl/bench/peers.py).

Convention for a bench module fusedrl/bench/bench_<name>.py:
- it defines `main(argv: list[str] | None = None) -> int`, parsing its own flags with
  argparse, at least `--smoke` (tiny shapes that run on CPU in seconds; writes no result
  file unless asked) and `--cases` (comma-separated subset of its case ids; all by default);
- it checks each provider against the reference before timing (see fusedrl/bench/common.py),
  prints one table and writes its rows under the results folder (fusedrl.bench.common.RESULTS_DIR) (not in smoke mode);
- it returns 0 when every row is ok or skipped for a stated reason, non-zero otherwise.
Importing the module must be cheap and must not touch the GPU.
"""
from __future__ import annotations

import argparse
import importlib
import os
import time
import traceback
from typing import Dict, List, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def discover() -> Dict[str, str]:
    """{name: module} for every fusedrl/bench/bench_<name>.py, sorted by name."""
    found = {}
    for filename in sorted(os.listdir(BENCH_DIR)):
        if filename.startswith("bench_") and filename.endswith(".py"):
            name = filename[len("bench_"):-len(".py")]
            found[name] = f"fusedrl.bench.{filename[:-len('.py')]}"
    return found


def run_one(module_name: str, argv: List[str]) -> tuple:
    """Import one bench module and run its main(argv); returns (status, return code)."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a bench whose import fails is reported; the others still run
        traceback.print_exc()
        return f"import error: {type(exc).__name__}: {exc}", 1
    entry = getattr(module, "main", None)
    if not callable(entry):
        return "skipped: no main(argv) (see fusedrl/bench/run_all.py for the convention)", 1
    try:
        code = entry(list(argv))
    except SystemExit as exc:  # argparse errors and explicit exits
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:
        traceback.print_exc()
        return f"error: {type(exc).__name__}: {exc}"[:200], 1
    code = 0 if code is None else int(code)
    return ("ok" if code == 0 else f"failed (return code {code})"), code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the requested benches in this process; returns 0 when all returned 0."""
    parser = argparse.ArgumentParser(
        prog="fusedrl bench", description="Run fusedrl benchmarks (fusedrl/bench/bench_*.py).",
        epilog="Flags not listed here (e.g. --cases) are passed to every bench that runs.")
    parser.add_argument("--only", default="", help="comma-separated bench names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for checking the bench code on CPU")
    parser.add_argument("--list", action="store_true", help="print the bench names and exit")
    args, passthrough = parser.parse_known_args(argv)
    benches = discover()
    if args.list:
        print("\n".join(benches))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(benches)
    unknown = [n for n in names if n not in benches]
    if unknown:
        parser.error(f"--only: unknown bench {unknown}, expected names from {list(benches)}")
    bench_argv = (["--smoke"] if args.smoke else []) + list(passthrough)
    from fusedrl.bench.peers import format_peer_versions
    print(format_peer_versions(), flush=True)  # which peers (and versions) the tables compare against
    summary = []
    for name in names:
        print(f"\n=== bench {name} {' '.join(bench_argv)}".rstrip(), flush=True)
        start = time.perf_counter()
        status, code = run_one(benches[name], bench_argv)
        summary.append((name, status, code, time.perf_counter() - start))
    print("\n=== summary")
    for name, status, code, seconds in summary:
        print(f"run_all: {name:<12} {status} ({seconds:.1f} s)")
    return 0 if all(code == 0 for _, _, code, _ in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
