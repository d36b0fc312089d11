"""Per-token log-probs from hidden states: fusedrl's `linear_logprobs` against its peers (LP-7B, LP-0.5B).

    python -m fusedrl.bench.bench_logprobs                       # both cases, forward and full, on the GPU
    python -m fusedrl.bench.bench_logprobs --cases LP-0.5B --modes full
    python -m fusedrl.bench.bench_logprobs --smoke               # tiny shapes on CPU, writes nothing
    python -m fusedrl.bench.bench_logprobs --device cpu --cases LP-CPU-2k-32k   # the exact CPU path vs eager

Cases (bench/NOTES.md): bf16 hidden (N, H) and weight (V, H) from a torch.Generator on the
device, seed 0 (hidden ~ N(0, 1), weight ~ N(0, 1) / sqrt(H)), labels uniform in [0, V) from seed 1,
upstream gradient random fp32 (fusedrl/bench/common.py). LP-7B: N=16384, H=4096, V=151936;
LP-0.5B: N=32768, H=896, V=151936.

Providers: fusedrl `linear_logprobs`; eager with bf16 logits (log_softmax(h @ W.T).gather);
eager with fp32 logits; a row-looped selective log-softmax (TRL's approach before 1.x: log_softmax one
sequence at a time, sequences of 1024 tokens); TRL's current chunked, logits-free head
(`trl.kernels.ChunkedLogProbFunction`, see fusedrl/bench/peers.py); Liger-Kernel's fused linear cross-entropy
with reduction="none" (logp = -loss); Cut Cross-Entropy `linear_cross_entropy(...,
reduction="none")` with its default gradient filter and with filter_eps=None (exact).
Liger and CCE are skipped with the reason when not importable.

FLOPs: forward 2 N H V, full 6 N H V (three matmuls; fusedrl's backward recomputes the
logits, so it performs 8 N H V). The 3-matmul roofline is 6 N H V at the bf16 matmul
ceiling measured in the same run (an 8192^3 bf16 matmul). "peak MiB" is memory above the
inputs; in full mode the hidden and weight gradients are subtracted (their size is the
same for every provider), matching bench/NOTES.md's anchors.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence

import torch

from fusedrl.bench.common import (Case, Provider, bench_arg_parser, bench_device, finish, matmul_ceiling_tflops,
                          parse_bench_args, run_case)
from fusedrl.bench.peers import trl_chunked_provider

CASES = {"LP-7B": (16384, 4096, 151936), "LP-0.5B": (32768, 896, 151936)}
SMOKE = {"LP-7B": (40, 24, 1000), "LP-0.5B": (48, 16, 257)}
# --device cpu: fp32, H = 896 (Qwen2.5-0.5B), N in {2048, 8192}, V in {32k, 152k}; eager's peak
# at LP-CPU-8k-152k is ~14 GiB, so that case needs a machine with room for it.
CPU_CASES = {"LP-CPU-2k-32k": (2048, 896, 32768), "LP-CPU-2k-152k": (2048, 896, 151936),
             "LP-CPU-8k-32k": (8192, 896, 32768), "LP-CPU-8k-152k": (8192, 896, 151936)}
CPU_SMOKE = {case: (40, 24, 1000) for case in CPU_CASES}
SEQ_LEN = 1024  # the row-looped provider's sequence length (TRL loops over sequences)


def make_inputs(n: int, hdim: int, vocab: int, device: str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Drawn on the target device (a CPU draw of 0.7 G normals would take seconds)."""
    gen = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(n, hdim, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hdim, generator=gen, device=device) / hdim ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator(device).manual_seed(1), device=device)
    return {"hidden": hidden, "weight": weight, "labels": labels}


def reference(inputs) -> torch.Tensor:
    """fusedrl's exact reference (float32, token-chunked), with large chunks for speed."""
    from fusedrl.kernels import _tiles
    from fusedrl.kernels.reference import linear_logprobs_reference

    saved = dict(_tiles.TILE_BYTES)
    _tiles.TILE_BYTES.update({kind: max(size, 1 << 30) for kind, size in saved.items()})
    try:
        return linear_logprobs_reference(inputs["hidden"], inputs["weight"], inputs["labels"])
    finally:
        _tiles.TILE_BYTES.update(saved)


def ours(inputs) -> torch.Tensor:
    from fusedrl.kernels import linear_logprobs

    return linear_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"])


def eager(dtype: Optional[torch.dtype]):
    def run(inputs):
        logits = inputs["hidden"] @ inputs["weight"].T
        logits = logits if dtype is None else logits.to(dtype)
        return torch.log_softmax(logits, dim=-1).gather(-1, inputs["labels"][:, None])[:, 0]
    return run


def row_looped(inputs) -> torch.Tensor:
    """TRL's selective_log_softmax for bf16 logits: log_softmax one sequence at a time."""
    logits = inputs["hidden"] @ inputs["weight"].T
    n = logits.shape[0]
    out = []
    for s in range(0, n, SEQ_LEN):
        row = torch.log_softmax(logits[s:s + SEQ_LEN], dim=-1)
        out.append(row.gather(-1, inputs["labels"][s:s + SEQ_LEN, None])[:, 0])
    return torch.cat(out)


def _first_tensor(out):
    """Liger's functional returned a tensor, a tuple or an output object across releases."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "loss")


def peers(device: str) -> List[Provider]:
    found = []
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        found.append(Provider("liger FLCE (none)", lambda i: -_first_tensor(liger(i["weight"], i["hidden"], i["labels"]))))
    except Exception as exc:
        found.append(Provider("liger FLCE (none)", None, reason=f"liger-kernel not importable ({type(exc).__name__})"))
    try:
        from cut_cross_entropy import linear_cross_entropy

        found.append(Provider("cce (default filter)", lambda i: -linear_cross_entropy(
            i["hidden"], i["weight"], i["labels"], reduction="none")))
        found.append(Provider("cce exact", lambda i: -linear_cross_entropy(
            i["hidden"], i["weight"], i["labels"], reduction="none", filter_eps=None)))
    except Exception as exc:
        reason = f"cut-cross-entropy not importable ({type(exc).__name__})"
        found += [Provider("cce (default filter)", None, reason=reason), Provider("cce exact", None, reason=reason)]
    if device != "cuda":
        found = [p if p.fn is None else Provider(p.name, None, reason="needs CUDA") for p in found]
    return found


def cce_torch_compile(inputs) -> torch.Tensor:
    """Cut Cross-Entropy's `torch_compile` implementation (the (N, V) logits, compiled elementwise)."""
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["labels"], reduction="none",
                                 impl="torch_compile")


def cpu_providers() -> List[Provider]:
    """fusedrl's exact CPU path vs eager fp32 and CCE's torch_compile path (where installed)."""
    found = [Provider("fusedrl", ours), Provider("eager fp32", eager(None)), trl_chunked_provider()]
    try:
        import cut_cross_entropy  # noqa: F401

        found.append(Provider("cce torch_compile", cce_torch_compile))
    except Exception as exc:
        found.append(Provider("cce torch_compile", None, reason=f"cut-cross-entropy not importable ({type(exc).__name__})"))
    return found


def cpu_summary(rows: List[dict]) -> str:
    """fusedrl / eager time and peak-memory ratios per CPU case and mode (the issue's targets)."""
    ok = {(r["case"], r["provider"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    lines = []
    for (case_id, name, mode), r in sorted(ok.items()):
        peer = ok.get((case_id, "eager fp32", mode))
        if name != "fusedrl" or peer is None:
            continue
        line = f"{case_id} {mode}: {r['ms_p50'] / peer['ms_p50']:.2f}x eager time"
        if r.get("peak_extra_bytes") is not None and peer.get("peak_extra_bytes"):
            line += f", {r['peak_extra_bytes'] / peer['peak_extra_bytes']:.3f}x eager peak memory"
        lines.append(line)
    return "\n".join(lines)


def providers(device: str) -> List[Provider]:
    return [
        Provider("fusedrl", ours),
        Provider("eager bf16 logits", eager(None)),
        Provider("eager fp32 logits", eager(torch.float32)),
        Provider("row-looped (TRL)", row_looped),
        trl_chunked_provider(),
    ] + peers(device)


def annotate(rows: List[dict], case_id: str, n: int, hdim: int, vocab: int, ceiling: float, grad_bytes: int):
    """Subtract the gradients from full-mode memory, add the roofline time and ratio."""
    flops = {"forward": 2.0 * n * hdim * vocab, "full": 6.0 * n * hdim * vocab}
    for r in rows:
        if r.get("status") != "ok" or r["case"] != case_id:
            continue
        if r["mode"] == "full" and r.get("peak_extra_bytes") is not None:
            r["peak_extra_bytes_raw"] = r["peak_extra_bytes"]
            r["peak_extra_bytes"] = max(0, r["peak_extra_bytes"] - grad_bytes)
        if r["mode"] in flops:
            r["roofline_ms"] = flops[r["mode"]] / (ceiling * 1e12) * 1e3
            r["x_roofline"] = r["ms_p50"] / r["roofline_ms"]


def summary(rows: List[dict], ceiling: float) -> str:
    """Ratios the targets are stated in: fusedrl vs CCE default, eager bf16 and the roofline."""
    lines = [f"matmul ceiling measured in this run: {ceiling:.3g} TFLOP/s; roofline = 1 matmul (forward), 3 (full)"]
    ok = {(r["case"], r["provider"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    for (case_id, name, mode), r in sorted(ok.items()):
        if name != "fusedrl":
            continue
        parts = [f"{case_id} {mode}: {r['ms_p50']:.2f} ms = {r['x_roofline']:.2f}x the matmul roofline"
                 f" ({r['roofline_ms']:.1f} ms)"]
        for peer in ("cce (default filter)", "eager bf16 logits"):
            if (case_id, peer, mode) in ok:
                parts.append(f"{r['ms_p50'] / ok[(case_id, peer, mode)]['ms_p50']:.2f}x {peer}")
        if r.get("peak_extra_bytes") is not None:
            parts.append(f"peak extra {r['peak_extra_bytes'] / 2**20:.0f} MiB")
        lines.append(", ".join(parts))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bench_arg_parser("bench_logprobs", __doc__, CASES, smoke_help="tiny shapes, CPU-friendly, no result file")
    args, cases = parse_bench_args(parser, argv, {**CASES, **CPU_CASES})
    if args.device == "cpu":
        return main_cpu(args, [c for c in cases if c in CPU_CASES] or list(CPU_CASES)[: 1 if args.smoke else None])
    device = bench_device("bench_logprobs", args.smoke, args.device)
    if device is None:
        return 1
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ceiling = matmul_ceiling_tflops(device)
    rows: List[dict] = []
    for case_id in cases:
        n, hdim, vocab = (SMOKE if args.smoke else CASES)[case_id]
        print(f"{case_id}: N={n} H={hdim} V={vocab} {dtype} on {device}", file=sys.stderr)
        case = Case(id=case_id, make_inputs=lambda: make_inputs(n, hdim, vocab, device, dtype), reference=reference,
                    flops={"forward": 2.0 * n * hdim * vocab, "full": 6.0 * n * hdim * vocab})
        case_rows = run_case(case, providers(device), modes=args.modes.split(","), ceiling_tflops=ceiling)
        grad_bytes = (n * hdim + vocab * hdim) * torch.empty(0, dtype=dtype).element_size()
        annotate(case_rows, case_id, n, hdim, vocab, ceiling, grad_bytes)
        rows += case_rows
        if device == "cuda":
            torch.cuda.empty_cache()
    # peers that are wrong or crash are results; only fusedrl's own rows decide the exit code
    return finish("logprobs", rows, args, extra={"matmul_ceiling_tflops": ceiling}, after_table=summary(rows, ceiling),
                  is_failure=lambda r: r["provider"] == "fusedrl" and r["status"] != "ok")


def main_cpu(args, cases: List[str]) -> int:
    """--device cpu: fp32 cases on the CPU, fusedrl vs eager (and CCE torch_compile), time and peak memory."""
    rows: List[dict] = []
    for case_id in cases:
        n, hdim, vocab = (CPU_SMOKE if args.smoke else CPU_CASES)[case_id]
        print(f"{case_id}: N={n} H={hdim} V={vocab} float32 on cpu, {torch.get_num_threads()} threads", file=sys.stderr)
        case = Case(id=case_id, make_inputs=lambda: make_inputs(n, hdim, vocab, "cpu", torch.float32),
                    reference=reference, flops={"forward": 2.0 * n * hdim * vocab, "full": 6.0 * n * hdim * vocab},
                    tol=1e-4)
        case_rows = run_case(case, cpu_providers(), modes=args.modes.split(","))
        for r in case_rows:  # memory beyond dh and dW, which every method returns
            if r.get("status") == "ok" and r["mode"] == "full" and r.get("peak_extra_bytes") is not None:
                r["peak_extra_bytes_raw"] = r["peak_extra_bytes"]
                r["peak_extra_bytes"] = max(0, r["peak_extra_bytes"] - (n * hdim + vocab * hdim) * 4)
        rows += case_rows
    return finish("logprobs-cpu", rows, args, extra={"threads": torch.get_num_threads()},
                  after_table=cpu_summary(rows), is_failure=lambda r: r["provider"] == "fusedrl" and r["status"] != "ok")


if __name__ == "__main__":
    raise SystemExit(main())
