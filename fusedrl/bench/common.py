"""The one benchmark runner every bench file uses.

A bench file builds a `Case` (inputs, an fp32/fp64 reference, FLOP and byte
counts) and a list of `Provider`s (fusedrl and its peers), then calls
`run_case`. Each provider is checked against the reference before it is timed;
a wrong one is reported as wrong, not timed. Rows go to a printed table and to
JSON under `RESULTS_DIR` (bench/results/ of a checkout) with the GPU name, versions and date.

Timing: `triton.testing.do_bench` on CUDA (median with p20/p80, warm-up and
repeats in milliseconds); on CPU a perf_counter loop (one warm-up, then three
runs, or one when a call takes seconds) -- it smoke-tests the bench code and
times the CPU cases (`--device cpu`), which compare fusedrl's exact CPU paths
with eager PyTorch on the same machine (CPU timings say nothing about GPU
kernels). Peak memory: CUDA's allocator stats, or the resident-set high-water
mark on Linux CPUs.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

def _results_dir() -> str:
    """Where result JSON goes: $FUSEDRL_BENCH_RESULTS, else bench/results/ of the source checkout this
    package sits in, else ./bench/results under the working directory (an installed package)."""
    if os.environ.get("FUSEDRL_BENCH_RESULTS"):
        return os.environ["FUSEDRL_BENCH_RESULTS"]
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(checkout, "pyproject.toml")) and os.path.isdir(os.path.join(checkout, "bench")):
        return os.path.join(checkout, "bench", "results")
    return os.path.join(os.getcwd(), "bench", "results")


RESULTS_DIR = _results_dir()
MODES = ("forward", "backward", "full")


@dataclass
class Provider:
    """One implementation under test. `fn(inputs) -> tensor or tuple of tensors`."""

    name: str
    fn: Optional[Callable[[Dict[str, Any]], Any]]
    reason: str = ""  # why it is unavailable (fn is None)
    tol: Optional[float] = None  # relative-error tolerance override for the check


@dataclass
class Case:
    """One canonical shape. `make_inputs()` returns leaf tensors (grad where differentiable)."""

    id: str
    make_inputs: Callable[[], Dict[str, Any]]
    reference: Callable[[Dict[str, Any]], Any]
    flops: Dict[str, float] = field(default_factory=dict)  # per mode
    bytes: Dict[str, float] = field(default_factory=dict)  # per mode
    tol: float = 2e-2  # max relative error (norm-wise) of each output vs the reference
    check_grads: bool = True


def device_info() -> Dict[str, str]:
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "absent"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:
        info["transformers"] = "absent"
    from fusedrl.bench.peers import peer_versions
    info["peers"] = peer_versions()
    return info


def _as_tuple(out) -> tuple:
    return out if isinstance(out, (tuple, list)) else (out,)


def _float_outputs(out) -> List[torch.Tensor]:
    return [t for t in _as_tuple(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _grad_leaves(inputs: Dict[str, Any]) -> List[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm().item()
    err = (a - e).norm().item()
    return err / denom if denom > 0 else err


def _upstream(outputs: Sequence[torch.Tensor], seed: int = 0) -> List[torch.Tensor]:
    gen = torch.Generator(device=outputs[0].device).manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype) for o in outputs]


def _forward_backward(fn, inputs, grads=None):
    outs = [o for o in _float_outputs(fn(inputs)) if o.requires_grad]
    if not outs:
        return None
    grads = grads or _upstream(outs)
    leaves = _grad_leaves(inputs)
    return torch.autograd.grad(outs, leaves, grads, allow_unused=True)


def check(case: Case, provider: Provider, inputs, ref_out, ref_grads) -> float:
    """Max relative error of the provider's outputs (and gradients) vs the reference."""
    out = provider.fn(inputs)
    errs = [_rel_err(a, e) for a, e in zip(_float_outputs(out), _float_outputs(ref_out))]
    if case.check_grads and ref_grads is not None:
        grads = _forward_backward(provider.fn, inputs)
        if grads is not None:
            errs += [_rel_err(g, r) for g, r in zip(grads, ref_grads) if g is not None and r is not None]
    return max(errs) if errs else 0.0


def time_ms(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> tuple:
    """(p50, p20, p80) in milliseconds."""
    if torch.cuda.is_available():
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(x) for x in q)
    start = time.perf_counter()
    fn()  # warm-up; a call of seconds (the CPU cases) is timed once more, a short one three times
    first = time.perf_counter() - start
    samples = []
    for _ in range(1 if first > CPU_LONG_CALL_S else 3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[0], samples[-1]


CPU_LONG_CALL_S = 2.0


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_peak_extra_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Peak resident memory above the resident memory before the call (Linux; None elsewhere).

    Resets the kernel's high-water mark (VmHWM) through /proc/self/clear_refs, runs fn, reads it back.
    Large CPU tensors are mmapped and returned to the OS when freed, so this sees each call's peak.
    """
    base = _proc_status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    fn()
    peak = _proc_status_bytes("VmHWM")
    return None if base is None or peak is None else max(0, peak - base)


def peak_extra_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Peak allocated memory above what was allocated before the call (CUDA; resident memory on CPU)."""
    if not torch.cuda.is_available():
        return cpu_peak_extra_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@functools.lru_cache(maxsize=None)
def matmul_ceiling_tflops(device: str) -> float:
    """Measured matmul TFLOP/s: bf16 8192^3 on the GPU (a small fp32 one on CPU, smoke only)."""
    size, dtype = (8192, torch.bfloat16) if device == "cuda" else (256, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    p50, _, _ = time_ms(lambda: a @ b)
    return 2 * size ** 3 / (p50 * 1e-3) / 1e12


@functools.lru_cache(maxsize=None)
def copy_ceiling_gbps(device: str) -> float:
    """Measured device copy GB/s, bytes read plus bytes written (1 GiB on the GPU, 16 MiB on CPU)."""
    numel = (1 << 29) if device == "cuda" else (1 << 23)
    src = torch.randn(numel, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    p50, _, _ = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (p50 * 1e-3) / 1e9


def _mode_fn(provider: Provider, inputs, mode: str) -> Callable[[], Any]:
    leaves = _grad_leaves(inputs)
    if mode == "forward":
        def run():
            with torch.no_grad() if not leaves else _null():
                return provider.fn(inputs)
        return run
    if mode == "full":
        grads_holder: List[Optional[List[torch.Tensor]]] = [None]

        def run_full():
            outs = [o for o in _float_outputs(provider.fn(inputs)) if o.requires_grad]
            if grads_holder[0] is None:
                grads_holder[0] = _upstream(outs)
            torch.autograd.backward(outs, grads_holder[0])
            for t in leaves:
                t.grad = None
        return run_full
    # backward alone: keep one graph and replay its backward
    outs = [o for o in _float_outputs(provider.fn(inputs)) if o.requires_grad]
    grads = _upstream(outs)

    def run_bwd():
        torch.autograd.backward(outs, grads, retain_graph=True)
        for t in leaves:
            t.grad = None
    return run_bwd


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_case(case: Case, providers: Sequence[Provider], modes: Sequence[str] = ("forward", "full"), *,
             ceiling_tflops: Optional[float] = None, ceiling_gbps: Optional[float] = None) -> List[dict]:
    """Check then time every provider on one case; returns one row per (provider, mode).

    With a measured ceiling (`matmul_ceiling_tflops`, `copy_ceiling_gbps`), rows carry
    `pct_ceiling`: achieved TFLOP/s (or GB/s when the case counts no FLOPs) as a percentage of it.
    """
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {m!r}")
    inputs = case.make_inputs()
    ref_out = case.reference(inputs)
    ref_grads = None
    if case.check_grads and _grad_leaves(inputs):
        ref_grads = _forward_backward(case.reference, inputs)
    ref_out = [t.detach() for t in _float_outputs(ref_out)]
    rows = []
    for p in providers:
        base = {"case": case.id, "provider": p.name}
        if p.fn is None:
            rows.append({**base, "mode": "-", "status": f"skipped: {p.reason}"})
            continue
        try:
            err = check(case, p, inputs, ref_out, ref_grads)
        except Exception as exc:  # a peer that crashes is reported, not fatal
            rows.append({**base, "mode": "-", "status": f"error: {type(exc).__name__}: {exc}"[:200]})
            continue
        tol = p.tol if p.tol is not None else case.tol
        if not math.isfinite(err) or err > tol:
            rows.append({**base, "mode": "-", "status": f"wrong (rel err {err:.2e} > {tol:.0e})", "max_rel_err": err})
            continue
        for mode in modes:
            try:
                fn = _mode_fn(p, inputs, mode)
                p50, p20, p80 = time_ms(fn)
                mem = peak_extra_bytes(fn)
            except Exception as exc:
                rows.append({**base, "mode": mode, "status": f"error: {type(exc).__name__}: {exc}"[:200]})
                continue
            row = {**base, "mode": mode, "status": "ok", "ms_p50": p50, "ms_p20": p20, "ms_p80": p80,
                   "peak_extra_bytes": mem, "max_rel_err": err}
            if mode in case.flops:
                row["tflops"] = case.flops[mode] / (p50 * 1e-3) / 1e12
            if mode in case.bytes:
                row["gbps"] = case.bytes[mode] / (p50 * 1e-3) / 1e9
            if "tflops" in row and ceiling_tflops:
                row["pct_ceiling"] = 100.0 * row["tflops"] / ceiling_tflops
            elif "gbps" in row and ceiling_gbps:
                row["pct_ceiling"] = 100.0 * row["gbps"] / ceiling_gbps
            rows.append(row)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def format_table(rows: Sequence[dict]) -> str:
    header = f"{'case':<12} {'provider':<38} {'mode':<8} {'ms p50 [p20-p80]':<24} {'TFLOP/s':>8} {'GB/s':>8} {'%ceil':>6} {'peak MiB':>9} {'rel err':>8}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.get("status") == "ok":
            t = f"{r['ms_p50']:.3f} [{r['ms_p20']:.3f}-{r['ms_p80']:.3f}]"
            tf = f"{r['tflops']:.1f}" if "tflops" in r else "-"
            gb = f"{r['gbps']:.0f}" if "gbps" in r else "-"
            mem = f"{r['peak_extra_bytes'] / 2**20:.0f}" if r.get("peak_extra_bytes") is not None else "-"
            pct = f"{r['pct_ceiling']:.0f}" if "pct_ceiling" in r else "-"
            lines.append(f"{r['case']:<12} {r['provider']:<38} {r['mode']:<8} {t:<24} {tf:>8} {gb:>8} {pct:>6} {mem:>9} "
                         f"{r['max_rel_err']:>8.1e}  ok")
        else:
            lines.append(f"{r['case']:<12} {r['provider']:<38} {r.get('mode', '-'):<8} {'':<24} {'':>8} {'':>8} {'':>6} {'':>9} {'':>8}  {r['status']}")
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[dict], extra: Optional[dict] = None, directory: str = RESULTS_DIR) -> str:
    """Write rows (with device info) to RESULTS_DIR/<name>-<device>-<date>.json; returns the path."""
    info = device_info()
    os.makedirs(directory, exist_ok=True)
    dev = "".join(c if c.isalnum() else "_" for c in info["device"]).strip("_")[:40]
    path = os.path.join(directory, f"{name}-{dev}-{info['date']}.json")
    with open(path, "w") as f:
        json.dump({"bench": name, **info, **(extra or {}), "rows": list(rows)}, f, indent=1)
    return path


# --- the command line every kernel bench shares (see fusedrl/bench/run_all.py for the convention) ---

SMOKE_HELP = "tiny fp32 shapes, CPU-friendly, no result file"


def bench_arg_parser(prog: str, doc: str, case_ids: Sequence[str], smoke_help: str = SMOKE_HELP) -> argparse.ArgumentParser:
    """The shared flags: --smoke, --cases (subset of `case_ids`), --modes, --results-dir.

    Args:
        prog: program name, e.g. "bench_grpo" (also prefixes `cuda_device_or_none`'s message).
        doc: the bench module's docstring; its first line is the description.
        case_ids: every case id the bench knows, in order; the default of --cases.
        smoke_help: help text of --smoke.
    Returns:
        an `argparse.ArgumentParser`; a bench may add its own flags before `parse_bench_args`.
    """
    case_ids = tuple(case_ids)
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--cases", default=",".join(case_ids), help=f"comma-separated subset of {case_ids}")
    parser.add_argument("--modes", default="forward,full", help="comma-separated: forward, backward, full")
    parser.add_argument("--results-dir", default=None, help="where to write JSON (default bench/results)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="cpu: the CPU cases (exact PyTorch paths vs eager), where a bench has them")
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                     case_ids: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """Parse `argv`; returns (args, the requested case ids). An unknown case is a parser error (exit 2)."""
    case_ids = tuple(case_ids)
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in case_ids]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {case_ids}")
    return args, cases


def bench_device(prog: str, smoke: bool, device: str = "auto") -> Optional[str]:
    """"cuda" (canonical shapes need a GPU), "cpu" in smoke mode or with --device cpu, or None (printed why)."""
    if smoke or device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    print(f"{prog}: no CUDA device; run with --smoke on CPU (CPU timings say nothing)")
    return None


def _peer_tolerant_failure(row: dict) -> bool:
    return row["status"] != "ok" and not row["status"].startswith("skipped")


def finish(name: str, rows: Sequence[dict], args: argparse.Namespace, extra: Optional[dict] = None,
           after_table: str = "", is_failure: Callable[[dict], bool] = _peer_tolerant_failure) -> int:
    """Print the table (then `after_table`), write the JSON unless smoke without --results-dir; exit code.

    Args:
        name: result-file stem, e.g. "grpo".
        rows: `run_case` rows of every case.
        args: from `parse_bench_args` (uses .smoke and .results_dir).
        extra: more top-level JSON fields, after {"smoke": args.smoke}.
        after_table: text printed after the table (e.g. a summary); nothing when empty.
        is_failure: which rows make the exit code 1; by default any row neither ok nor skipped.
    Returns:
        0 when no row is a failure, else 1.
    """
    print(format_table(rows))
    if after_table:
        print(after_table)
    if not args.smoke or args.results_dir:
        directory = {"directory": args.results_dir} if args.results_dir else {}
        path = write_results(name, rows, extra={"smoke": args.smoke, **(extra or {})}, **directory)
        print(f"wrote {path}")
    return 1 if any(is_failure(r) for r in rows) else 0
