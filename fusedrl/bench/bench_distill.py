"""Distillation divergence from hidden states: fusedrl's `linear_distill_loss` against its peers (DISTILL-7B).

    python -m fusedrl.bench.bench_distill                      # DISTILL-7B, forward and full, on the GPU
    python -m fusedrl.bench.bench_distill --modes full
    python -m fusedrl.bench.bench_distill --smoke              # tiny shapes on CPU, writes nothing

Case (bench/NOTES.md): reverse KL, temperature 1, token mean; student and teacher both
H = 4096, bf16, N = 16384 tokens, V = 151936. Inputs from a torch.Generator on the device,
seed 0: hidden ~ N(0, 1), weights ~ N(0, 1) / sqrt(H); only the student's hidden states and
weight take gradients; the upstream gradient is a random scalar (fusedrl/bench/common.py).

Providers: fusedrl `linear_distill_loss(kind="reverse_kl")`; eager (the two bf16 logits
matmuls, float32 log-softmax of each, sum p_S (log p_S - log p_T), mean); Liger-Kernel's
`LigerFusedLinearJSD(jsd_beta=1.0)` (reverse KL in its convention) when importable.

FLOPs: 8 N H V for the full step of every provider (two logits matmuls forward, dh and dW
backward). fusedrl forms the gradient during the forward pass when the student requires grad,
so its "forward" row already holds all four matmuls and its backward is a scaling.
"peak MiB" is memory above the inputs; in full mode the student's hidden and weight
gradients are subtracted (the same for every provider).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence

import torch

from fusedrl.bench.common import (Case, Provider, bench_arg_parser, bench_device, finish, matmul_ceiling_tflops,
                          parse_bench_args, run_case)

CASES = {"DISTILL-7B": (16384, 4096, 151936)}
SMOKE = {"DISTILL-7B": (40, 24, 1000)}


def make_inputs(n: int, hdim: int, vocab: int, device: str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    student_hidden = torch.randn(n, hdim, generator=gen, device=device).to(dtype).requires_grad_()
    student_weight = (torch.randn(vocab, hdim, generator=gen, device=device) / hdim ** 0.5).to(dtype).requires_grad_()
    teacher_hidden = torch.randn(n, hdim, generator=gen, device=device).to(dtype)
    teacher_weight = (torch.randn(vocab, hdim, generator=gen, device=device) / hdim ** 0.5).to(dtype)
    return {"student_hidden": student_hidden, "student_weight": student_weight, "teacher_hidden": teacher_hidden,
            "teacher_weight": teacher_weight}


def _args(inputs):
    return inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"]


def reference(inputs) -> torch.Tensor:
    """fusedrl's exact float32 reference (token-chunked torch), with large chunks for speed."""
    from fusedrl.kernels import _distill_ref, force_backend, linear_distill_loss

    saved = _distill_ref.CHUNK_ELEMS
    _distill_ref.CHUNK_ELEMS = 1 << 28
    try:
        with force_backend("reference"):
            return linear_distill_loss(*_args(inputs), kind="reverse_kl")[0]
    finally:
        _distill_ref.CHUNK_ELEMS = saved


def ours(inputs) -> torch.Tensor:
    from fusedrl.kernels import linear_distill_loss

    return linear_distill_loss(*_args(inputs), kind="reverse_kl")[0]


def eager(inputs) -> torch.Tensor:
    hs, ws, ht, wt = _args(inputs)
    log_ps = torch.log_softmax((hs @ ws.T).float(), dim=-1)
    log_pt = torch.log_softmax((ht @ wt.T).float(), dim=-1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()


def peers(device: str) -> List[Provider]:
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=1.0)
        found = [Provider("liger fused linear JSD (beta 1)", lambda i: liger(*_args(i)))]
    except Exception as exc:
        found = [Provider("liger fused linear JSD (beta 1)", None,
                          reason=f"liger-kernel not importable ({type(exc).__name__})")]
    if device != "cuda":
        found = [p if p.fn is None else Provider(p.name, None, reason="needs CUDA") for p in found]
    return found


def providers(device: str) -> List[Provider]:
    return [Provider("fusedrl", ours), Provider("eager (bf16 logits, fp32 log-softmax)", eager)] + peers(device)


def annotate(rows: List[dict], n: int, hdim: int, vocab: int, ceiling: float, grad_bytes: int) -> None:
    """Subtract the gradients from full-mode memory; add the 8 N H V floor and the ratio to it."""
    floor_ms = 8.0 * n * hdim * vocab / (ceiling * 1e12) * 1e3
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r["mode"] == "full" and r.get("peak_extra_bytes") is not None:
            r["peak_extra_bytes_raw"] = r["peak_extra_bytes"]
            r["peak_extra_bytes"] = max(0, r["peak_extra_bytes"] - grad_bytes)
        if r["mode"] == "full":
            r["floor_ms"] = floor_ms
            r["x_floor"] = r["ms_p50"] / floor_ms


def summary(rows: List[dict], ceiling: float) -> str:
    """The ratios the targets are stated in: fusedrl full vs eager and vs Liger, and vs the 4-matmul floor."""
    lines = [f"matmul ceiling measured in this run: {ceiling:.3g} TFLOP/s; floor = 4 matmuls (8 N H V)"]
    ok = {(r["provider"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    mine = ok.get(("fusedrl", "full"))
    if mine is None:
        return "\n".join(lines + ["fusedrl full: no ok row"])
    parts = [f"DISTILL-7B full: {mine['ms_p50']:.2f} ms = {mine['x_floor']:.2f}x the floor ({mine['floor_ms']:.1f} ms)"]
    for peer in ("eager (bf16 logits, fp32 log-softmax)", "liger fused linear JSD (beta 1)"):
        if (peer, "full") in ok:
            parts.append(f"{mine['ms_p50'] / ok[(peer, 'full')]['ms_p50']:.2f}x {peer}")
    if mine.get("peak_extra_bytes") is not None:
        parts.append(f"peak extra {mine['peak_extra_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines + [", ".join(parts)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bench_arg_parser("bench_distill", __doc__, CASES, smoke_help="tiny shapes, CPU-friendly, no result file")
    args, cases = parse_bench_args(parser, argv, CASES)
    device = bench_device("bench_distill", args.smoke)
    if device is None:
        return 1
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ceiling = matmul_ceiling_tflops(device)
    rows: List[dict] = []
    for case_id in cases:
        n, hdim, vocab = (SMOKE if args.smoke else CASES)[case_id]
        print(f"{case_id}: N={n} H={hdim} V={vocab} {dtype} on {device}", file=sys.stderr)
        flops = {"forward": 4.0 * n * hdim * vocab, "full": 8.0 * n * hdim * vocab}
        case = Case(id=case_id, make_inputs=lambda: make_inputs(n, hdim, vocab, device, dtype), reference=reference,
                    flops=flops)
        case_rows = run_case(case, providers(device), modes=args.modes.split(","), ceiling_tflops=ceiling)
        grad_bytes = (n * hdim + vocab * hdim) * torch.empty(0, dtype=dtype).element_size()
        annotate(case_rows, n, hdim, vocab, ceiling, grad_bytes)
        rows += case_rows
        if device == "cuda":
            torch.cuda.empty_cache()
    return finish("distill", rows, args, extra={"matmul_ceiling_tflops": ceiling}, after_table=summary(rows, ceiling),
                  is_failure=lambda r: r["provider"] == "fusedrl" and r["status"] != "ok")


if __name__ == "__main__":
    raise SystemExit(main())
