"""CPU benchmark of the packing core: C++ (`fusedrl._C`) vs the pure-Python fallback.

Both backends get the same input through the public API (`fusedrl.packing`):
n sequence lengths `random.Random(0).randint(16, 4096)` as a numpy int64 array
(n = 16384 by default; case k8-eq-list passes a Python list instead). Each
case is checked first (the two outputs must be identical), then timed: medians of thread CPU time (primary: the code is
single-threaded and CPU time ignores other processes on a shared machine) and
of wall time, the backends interleaved (`repeats` rounds of 1 Python run and
5 C++ runs) so machine load hits both alike.
Reports the speed ratio and both results' quality (max group cost against the
lower bound max(sum/k, largest item); bins used against ceil(total/budget)).

    python -m fusedrl.bench.bench_packing                 # full size, writes bench/results/packing-cpu-*.json
    python -m fusedrl.bench.bench_packing --smoke         # n=200, one repeat, writes nothing
    python -m fusedrl.bench.bench_packing --cases k8,budget
    python -m fusedrl.bench.bench_packing --scaling       # C++ at n = 10k, 100k, 1M: time per 10x n

Target (bench/NOTES.md): C++ >= 20x the Python reference at 16k sequences, same quality.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from fusedrl.bench.common import device_info, write_results
from fusedrl import packing

A, B = 1.0, 1.0 / 4096  # attention-aware cost a*L + b*L^2
CPP_RUNS_PER_ROUND = 5

# case id -> (op, keyword arguments, input form: "numpy" int64 array or Python "list")
CASES: Dict[str, tuple] = {
    "k8": ("balanced_partition", {"k": 8, "a": A, "b": B, "equal_size": False}, "numpy"),
    "k8-equal": ("balanced_partition", {"k": 8, "a": A, "b": B, "equal_size": True}, "numpy"),
    "k8-eq-list": ("balanced_partition", {"k": 8, "a": A, "b": B, "equal_size": True}, "list"),
    "k64": ("balanced_partition", {"k": 64, "a": A, "b": B, "equal_size": False}, "numpy"),
    "budget": ("pack_by_budget", {"budget": 16384}, "numpy"),
}


def make_lengths(n: int) -> np.ndarray:
    """(n,) int64 lengths, random.Random(0).randint(16, 4096)."""
    rnd = random.Random(0)
    return np.array([rnd.randint(16, 4096) for _ in range(n)], dtype=np.int64)


def _interleaved_ms(fns: Dict[str, Callable[[], object]], repeats: Dict[str, int], rounds: int) -> Dict[str, tuple]:
    """{backend: (median thread-CPU ms, median wall ms)}, the backends' runs interleaved
    round by round. Thread CPU time is the primary number: the code is single-threaded,
    and on a shared machine wall time also counts the time other processes held the core."""
    samples: Dict[str, List[tuple]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats[name]):
                cpu, wall = time.thread_time(), time.perf_counter()
                fn()
                samples[name].append(((time.thread_time() - cpu) * 1e3, (time.perf_counter() - wall) * 1e3))
    return {name: (statistics.median(c for c, _ in values), statistics.median(w for _, w in values))
            for name, values in samples.items()}


def _quality(op: str, lengths: np.ndarray, groups: List[List[int]], kwargs: dict) -> dict:
    if op == "pack_by_budget":
        loads = [int(lengths[g].sum()) for g in groups]
        return {"bins": len(groups), "bins_lower_bound": -(-int(lengths.sum()) // kwargs["budget"]),
                "max_load": max(loads, default=0)}
    costs = packing.partition_cost(lengths, groups, a=kwargs["a"], b=kwargs["b"])
    items = lengths.astype(np.float64)
    item_costs = kwargs["a"] * items + kwargs["b"] * items * items
    bound = max(item_costs.sum() / kwargs["k"], item_costs.max(initial=0.0))
    sizes = [len(g) for g in groups]
    return {"max_cost": max(costs), "lower_bound": float(bound), "max_over_bound": max(costs) / bound,
            "size_spread": max(sizes) - min(sizes)}


def run_one(case: str, lengths: np.ndarray, rounds: int) -> dict:
    """Check then time one case on both backends; returns one row."""
    op, kwargs, form = CASES[case]
    fn = getattr(packing, op)
    row = {"case": case, "op": op, "n": int(lengths.size), "input": form, **kwargs}
    given = lengths.tolist() if form == "list" else lengths
    py_out = fn(given, **kwargs, backend="python")
    row.update({f"python_{k}": v for k, v in _quality(op, lengths, py_out, kwargs).items()})
    fns = {"python": lambda: fn(given, **kwargs, backend="python")}
    if packing._C is None:
        row.update(status="cpp skipped: fusedrl._C is not built", same_result=None)
    else:
        cpp_out = fn(given, **kwargs, backend="cpp")
        row["same_result"] = cpp_out == py_out
        row.update({f"cpp_{k}": v for k, v in _quality(op, lengths, cpp_out, kwargs).items()})
        row["status"] = "ok" if row["same_result"] else "wrong: C++ and Python results differ"
        fns["cpp"] = lambda: fn(given, **kwargs, backend="cpp")
    # C++ runs are short: more of them per round for a stable median.
    times = _interleaved_ms(fns, {"python": 1, "cpp": CPP_RUNS_PER_ROUND}, rounds)
    row["python_ms"], row["python_wall_ms"] = times["python"]
    if "cpp" in times:
        row["cpp_ms"], row["cpp_wall_ms"] = times["cpp"]
        row["speedup"] = row["python_ms"] / row["cpp_ms"]
        row["speedup_wall"] = row["python_wall_ms"] / row["cpp_wall_ms"]
    return row


def format_rows(rows: Sequence[dict]) -> str:
    header = (f"{'case':<11} {'n':>6} {'python ms':>10} {'C++ ms':>8} {'ratio':>7} {'(wall)':>7}  "
              f"{'quality (python / C++)':<44} status")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["op"] == "pack_by_budget":
            quality = f"bins {r['python_bins']} / {r.get('cpp_bins', '-')} (>= {r['python_bins_lower_bound']})"
        else:
            cpp = f"{r['cpp_max_over_bound']:.6f}" if "cpp_max_over_bound" in r else "-"
            quality = f"max cost / bound {r['python_max_over_bound']:.6f} / {cpp}"
        cpp_ms = f"{r['cpp_ms']:.3f}" if "cpp_ms" in r else "-"
        ratio = f"{r['speedup']:.1f}x" if "speedup" in r else "-"
        wall = f"{r['speedup_wall']:.1f}x" if "speedup_wall" in r else "-"
        lines.append(f"{r['case']:<11} {r['n']:>6} {r['python_ms']:>10.3f} {cpp_ms:>8} {ratio:>7} {wall:>7}  "
                     f"{quality:<44} {r['status']}")
    return "\n".join(lines)


def run(n: int = 16384, repeats: int = 9, cases: Optional[Sequence[str]] = None,
        results_dir: Optional[str] = None) -> List[dict]:
    """Run the cases, print the table, write JSON to `results_dir` when given; returns the rows."""
    lengths = make_lengths(n)
    rows = [run_one(case, lengths, repeats) for case in (cases or list(CASES))]
    info = device_info()
    print(f"packing on {platform.processor() or platform.machine()} x{os.cpu_count()} (load {os.getloadavg()[0]:.1f}, "
          f"python {info['python']}, backend default: {packing.BACKEND}), n={n}, lengths randint(16, 4096), "
          f"cost a={A} b=1/4096")
    print(format_rows(rows))
    if results_dir is not None:
        extra = {"host_cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "load_average_1m": os.getloadavg()[0], "timing": (f"medians of thread CPU time (*_ms) and wall time (*_wall_ms), {repeats} rounds, "
                             f"each 1 python run then {CPP_RUNS_PER_ROUND} C++ runs")}
        path = write_results("packing-cpu", rows, extra=extra, directory=results_dir)
        print(f"wrote {path}")
    return rows


SCALING_NS = (10_000, 100_000, 1_000_000)


def scaling(cases: Sequence[str], ns: Sequence[int] = SCALING_NS, repeats: int = 5,
            results_dir: Optional[str] = None) -> List[dict]:
    """C++ time against n (10k -> 1M): O(n log n) means <= ~12x per 10x; prints and writes rows.

    Lengths numpy.random.default_rng(0).integers(16, 4097, n); minimum thread CPU time of `repeats`
    runs per point (the minimum: cache and scheduler noise on a shared machine only add time).
    """
    rows = []
    for case in cases:
        op, kwargs, _ = CASES[case]
        fn = getattr(packing, op)
        last = None
        for n in ns:
            lengths = np.random.default_rng(0).integers(16, 4097, n).astype(np.int64)
            best = min(_thread_ms(lambda: fn(lengths, **kwargs, backend="cpp")) for _ in range(repeats))
            row = {"case": case, "op": op, "n": n, "cpp_ms": best, **kwargs}
            if last is not None:
                row["x_per_10x"] = (best / last) ** (1.0 / math.log10(n / prev_n))
            rows.append(row)
            last, prev_n = best, n
            print(f"{case:<11} n={n:>8}  C++ {best:9.2f} ms" + (f"  x{row['x_per_10x']:.1f} per 10x n" if "x_per_10x" in row else ""))
    if results_dir is not None:
        path = write_results("packing-scaling-cpu", rows, extra={"load_average_1m": os.getloadavg()[0], "timing": (
            f"minimum thread CPU time of {repeats} runs, public API (validation and list conversion included)")},
            directory=results_dir)
        print(f"wrote {path}")
    return rows


def _thread_ms(fn: Callable[[], object]) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bench entry point (see fusedrl/bench/run_all.py for the convention); returns 0 when every row is ok."""
    from fusedrl.bench.common import RESULTS_DIR

    parser = argparse.ArgumentParser(prog="bench_packing", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="n=200, one repeat, no result file")
    parser.add_argument("--cases", default="", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--n", type=int, default=None, help="number of sequences (default 16384)")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 9; 1 in smoke)")
    parser.add_argument("--results-dir", default=None, help="where to write JSON (default bench/results; none in smoke)")
    parser.add_argument("--scaling", action="store_true", help="C++ time at n = 10k, 100k, 1M (the O(n log n) check)")
    parser.add_argument("--device", default="cpu", choices=("cpu",), help="the packing core runs on the host only")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c] or list(CASES)
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}, expected a subset of {list(CASES)}")
    n = args.n or (200 if args.smoke else 16384)
    repeats = args.repeats or (1 if args.smoke else 9)
    results_dir = args.results_dir or (None if args.smoke else RESULTS_DIR)
    if args.scaling:
        if packing._C is None:
            print("bench_packing --scaling: fusedrl._C is not built")
            return 1
        scaling([c for c in cases if CASES[c][2] == "numpy"], ns=(200, 2000) if args.smoke else SCALING_NS,
                repeats=1 if args.smoke else 5, results_dir=results_dir)
        return 0
    rows = run(n=n, repeats=repeats, cases=cases, results_dir=results_dir)
    return 0 if all(r["status"].startswith(("ok", "cpp skipped")) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
