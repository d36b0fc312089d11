"""`fusedrl profile OP`: time and peak memory of one op against eager and the installed peers.

    fusedrl profile linear_logprobs --shape N=16384,H=4096,V=151936 --dtype bf16 --backward
    fusedrl profile varlen_attention --shape T=8192,HQ=16,HKV=4,D=128,L=512 --trace attn.json
    fusedrl profile policy_loss --device cpu --dtype fp32 --shape N=65536,B=64
    fusedrl profile kl --smoke                       # tiny shapes on the CPU (what the tests run)
    fusedrl profile --list                           # the ops and their shape keys

Every provider is first checked against the op's exact reference (outputs and, with
--backward, gradients); a wrong one is reported, not timed. Rows: median time [p20-p80],
achieved TFLOP/s and its % of this machine's matmul ceiling, achieved GB/s (the op's minimal
traffic: its inputs read and outputs written; in backward the upstream gradient and the
input gradients too) and its % of the copy ceiling, peak memory above the inputs. The
ceilings are measured in the same run: a large GEMM in the op's dtype and a large
device-to-device copy (fusedrl/profile/ceilings.py). `--trace` writes a torch.profiler
Chrome trace of one call (forward, and backward with --backward) of every provider that
passed the check, each inside a `provider:<name>` range.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence

import torch

from fusedrl.bench.common import _float_outputs, _grad_leaves, _mode_fn, run_case
from fusedrl.bench.peers import format_peer_versions, peer_versions
from fusedrl.profile.ceilings import copy_ceiling_gbps, matmul_ceiling_tflops
from fusedrl.profile.ops import OPS, parse_dtype, parse_shape


def _nbytes(tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def traffic_bytes(inputs: Dict, outputs: Sequence[torch.Tensor]) -> Dict[str, float]:
    """Minimal bytes each mode must move: forward reads the inputs and writes the outputs; backward reads
    the inputs and the upstream gradient (the size of the outputs) and writes a gradient per grad leaf."""
    read = _nbytes(inputs.values())
    out = _nbytes(outputs)
    grads = _nbytes(_grad_leaves(inputs))
    forward, backward = read + out, read + out + grads
    return {"forward": forward, "backward": backward, "full": forward + backward}


def _annotate(rows: List[dict], tflops_ceiling: float, gbps_ceiling: float) -> None:
    for r in rows:
        if r.get("status") != "ok":
            continue
        r.pop("pct_ceiling", None)
        if "tflops" in r:
            r["pct_matmul"] = 100.0 * r["tflops"] / tflops_ceiling
        if "gbps" in r:
            r["pct_copy"] = 100.0 * r["gbps"] / gbps_ceiling


def format_rows(rows: Sequence[dict]) -> str:
    header = (f"{'provider':<40} {'mode':<8} {'ms p50 [p20-p80]':<26} {'TFLOP/s':>8} {'%mm':>5} {'GB/s':>8} "
              f"{'%copy':>5} {'peak MiB':>9} {'rel err':>8}  status")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['provider']:<40} {r.get('mode', '-'):<8} {'':<26} {'':>8} {'':>5} {'':>8} {'':>5} "
                         f"{'':>9} {'':>8}  {r['status']}")
            continue
        t = f"{r['ms_p50']:.3f} [{r['ms_p20']:.3f}-{r['ms_p80']:.3f}]"
        num = lambda key, fmt: format(r[key], fmt) if key in r else "-"  # noqa: E731
        mem = f"{r['peak_extra_bytes'] / 2**20:.1f}" if r.get("peak_extra_bytes") is not None else "-"
        lines.append(f"{r['provider']:<40} {r['mode']:<8} {t:<26} {num('tflops', '.3g'):>8} "
                     f"{num('pct_matmul', '.0f'):>5} {num('gbps', '.3g'):>8} {num('pct_copy', '.0f'):>5} {mem:>9} "
                     f"{r['max_rel_err']:>8.1e}  ok")
    return "\n".join(lines)


def write_trace(path: str, case, providers, rows: List[dict], backward: bool, device: str) -> None:
    """One call of every provider that passed its check, under torch.profiler; a Chrome trace at `path`."""
    passed = {r["provider"] for r in rows if r.get("status") == "ok"}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    inputs = case.make_inputs()
    with torch.profiler.profile(activities=activities) as prof:
        for p in providers:
            if p.name not in passed:
                continue
            run = _mode_fn(p, inputs, "full" if backward and _grad_leaves(inputs) else "forward")
            with torch.profiler.record_function(f"provider:{p.name}"):
                run()
            if device == "cuda":
                torch.cuda.synchronize()
    prof.export_chrome_trace(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedrl profile", description=__doc__.splitlines()[0],
                                     epilog="fusedrl profile run CONFIG.toml --steps N: profile training steps "
                                            "(fusedrl profile run --help)")
    parser.add_argument("op", nargs="?", choices=sorted(OPS), help="the op to profile")
    parser.add_argument("--shape", default="", help="sizes, e.g. N=4096,H=896,V=151936 or 4096x896x151936 "
                                                    "(missing keys take the op's default; see --list)")
    parser.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 / fp64 (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--backward", action="store_true", help="also time backward alone and forward+backward")
    parser.add_argument("--trace", default=None,
                        help="write a torch.profiler Chrome trace (chrome://tracing, Perfetto)")
    parser.add_argument("--json", default=None, help="write the rows, ceilings and versions as JSON")
    parser.add_argument("--smoke", action="store_true", help="the op's tiny shape, small ceilings (CPU, seconds)")
    parser.add_argument("--list", action="store_true", help="print the ops, their shape keys and defaults")
    return parser


def list_ops() -> str:
    return "\n".join(f"{name:<20} --shape {','.join(f'{k}={spec.default[k]}' for k in spec.keys)}"
                     for name, spec in OPS.items())


def _device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch sees no CUDA device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        print(list_ops())
        return 0
    if args.op is None:
        parser.error("name an op (fusedrl profile --list) or use `fusedrl profile run CONFIG.toml`")
    spec = OPS[args.op]
    try:
        device = _device(args.device)
        dtype = parse_dtype(args.dtype or ("bf16" if device == "cuda" else "fp32"))
        shape = parse_shape(spec, args.shape, smoke=args.smoke)
        case, providers = spec.build(shape, dtype, device)
    except ValueError as err:
        parser.error(str(err))
    modes = ("forward", "backward", "full") if args.backward else ("forward",)
    print(f"{spec.name} {' '.join(f'{k}={shape[k]}' for k in spec.keys)} {dtype} on {device}", file=sys.stderr)
    inputs = case.make_inputs()
    with torch.no_grad():
        outputs = _float_outputs(providers[0].fn(inputs))
    case.bytes = traffic_bytes(inputs, outputs)
    del inputs, outputs
    tflops = matmul_ceiling_tflops(device, dtype, smoke=args.smoke)
    gbps = copy_ceiling_gbps(device, smoke=args.smoke)
    if not args.backward:
        case.check_grads = False
    rows = run_case(case, providers, modes=modes)
    _annotate(rows, tflops, gbps)
    print(format_rows(rows))
    print(f"ceilings measured now: matmul {tflops:.3g} TFLOP/s ({dtype}), copy {gbps:.3g} GB/s (read + write)")
    print(format_peer_versions())
    if args.trace:
        write_trace(args.trace, case, providers, rows, args.backward, device)
        print(f"wrote {args.trace}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"op": spec.name, "shape": shape, "dtype": str(dtype), "device": device, "modes": list(modes),
                       "matmul_ceiling_tflops": tflops, "copy_ceiling_gbps": gbps, "peers": peer_versions(),
                       "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    ours = [r for r in rows if r["provider"] == "fusedrl"]
    return 0 if ours and all(r["status"] == "ok" for r in ours) else 1
