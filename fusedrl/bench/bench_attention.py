"""Packed-sequence attention: fusedrl's `varlen_attention` against its peers (ATTN-LONG, ATTN-RL).

    python -m fusedrl.bench.bench_attention                      # both cases, forward and full, on the GPU
    python -m fusedrl.bench.bench_attention --cases ATTN-RL --modes full
    python -m fusedrl.bench.bench_attention --smoke              # tiny fp32 shapes on CPU, writes nothing
    python -m fusedrl.bench.bench_attention --device cpu         # the CPU path vs the per-document loop

Cases (bench/NOTES.md): causal, bf16, Hq=32, Hkv=8, D=128, 16384 tokens; document
lengths from `random.Random(0)` (ATTN-LONG: randint(total//64, total//4), 7 documents;
ATTN-RL: lognormal around 300 clipped to [16, 4096], 37 documents), the last one cut to fit.

Providers: fusedrl (Triton); torch.nn.attention.varlen.varlen_attn (FA2 inside torch; its
causal flag is `is_causal` in some releases and `window_size=(-1, 0)` in others, and GQA
needs `enable_gqa` where it exists, else K/V are expanded); FlexAttention with a
document-causal block mask (compiled, mask built once outside the timing); SDPA on the
padded (num_docs, H, max_len, D) batch, pad and unpad included in the timing; and
flash_attn_varlen_func when flash-attn is installed. Peers that need CUDA are skipped on
CPU with the reason. FLOPs: forward = sum_docs 2 * L^2 * D * Hq (causal), full = 3.5x forward.
"""
from __future__ import annotations

import inspect
import math
import random
import sys
from typing import Dict, List, Optional, Sequence

import torch

from fusedrl.bench.common import (Case, Provider, bench_arg_parser, bench_device, finish, matmul_ceiling_tflops,
                          parse_bench_args, run_case)

CASE_IDS = ("ATTN-LONG", "ATTN-RL")
# --device cpu: the demo's model (Hq=4, Hkv=2, D=32, fp32, one thread), packed micro-batches of
# short documents; ATTN-CPU-RL: the ATTN-RL length recipe scaled down to 4096 tokens.
CPU_CASE_IDS = ("ATTN-CPU-DEMO", "ATTN-CPU-RL")


def demo_lengths(total: int = 1400) -> List[int]:
    """ATTN-CPU-DEMO recipe: randint(4, 40) tokens per document until full, the last one cut."""
    rnd, lengths = random.Random(0), []
    while sum(lengths) < total:
        lengths.append(min(rnd.randint(4, 40), total - sum(lengths)))
    return lengths


def long_lengths(total: int) -> List[int]:
    """ATTN-LONG recipe: randint(total // 64, total // 4) until full, the last one cut."""
    rnd, lengths = random.Random(0), []
    while sum(lengths) < total:
        lengths.append(min(rnd.randint(total // 64, total // 4), total - sum(lengths)))
    return lengths


def rl_lengths(total: int, median: float = 300.0, low: int = 16, high: int = 4096) -> List[int]:
    """ATTN-RL recipe: int(clip(lognormvariate(log(median), 0.9), low, high)), the last one cut."""
    rnd, lengths = random.Random(0), []
    while sum(lengths) < total:
        draw = int(min(max(rnd.lognormvariate(math.log(median), 0.9), low), high))
        lengths.append(min(draw, total - sum(lengths)))
    return lengths


def causal_flops(lengths: Sequence[int], head_dim: int, num_heads: int) -> Dict[str, float]:
    forward = float(sum(2 * n * n * head_dim * num_heads for n in lengths))
    return {"forward": forward, "full": 3.5 * forward}


def make_case(case_id: str, lengths: List[int], num_heads: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, device: str) -> Case:
    from fusedrl.kernels.reference import varlen_attention_reference

    total = sum(lengths)
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)

    def make_inputs():
        gen = torch.Generator(device=device).manual_seed(0)
        shape_q, shape_kv = (total, num_heads, head_dim), (total, num_kv_heads, head_dim)
        q, k, v = (torch.randn(s, generator=gen, device=device, dtype=dtype).requires_grad_(True)
                   for s in (shape_q, shape_kv, shape_kv))
        return {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens, "max_seqlen": max(lengths), "lengths": lengths}

    def reference(inputs):  # float32, one document at a time, explicit masks
        q, k, v = (inputs[n].float() for n in ("q", "k", "v"))
        return varlen_attention_reference(q, k, v, inputs["cu_seqlens"], inputs["max_seqlen"], causal=True)

    return Case(id=case_id, make_inputs=make_inputs, reference=reference,
                flops=causal_flops(lengths, head_dim, num_heads), tol=2e-2)


def _ours(inputs):
    from fusedrl.kernels import varlen_attention

    return varlen_attention(inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens"], inputs["max_seqlen"])


def _torch_varlen() -> Provider:
    name = "torch varlen_attn (FA2)"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as exc:
        return Provider(name, None, reason=f"torch.nn.attention.varlen absent ({type(exc).__name__})")
    if not torch.cuda.is_available():
        return Provider(name, None, reason="needs CUDA")
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    native_gqa = "enable_gqa" in params

    def fn(inputs):
        q, k, v, cu, n = (inputs[x] for x in ("q", "k", "v", "cu_seqlens", "max_seqlen"))
        extra = dict(causal)
        if native_gqa:
            extra["enable_gqa"] = True
        elif k.shape[1] != q.shape[1]:  # older releases: expand K/V to Hq heads (counted in the time)
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return varlen_attn(q, k, v, cu, cu, n, n, **extra)

    return Provider(name if native_gqa else name + " kv-expanded", fn)


def _flex(lengths: Sequence[int], device: str) -> Provider:
    name = "FlexAttention doc mask"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:
        return Provider(name, None, reason=f"flex_attention absent ({type(exc).__name__})")
    if device != "cuda":
        return Provider(name, None, reason="needs CUDA (compiled)")
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))
    total = sum(lengths)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(inputs):
        q, k, v = (inputs[x].transpose(0, 1).unsqueeze(0) for x in ("q", "k", "v"))  # (1, H, T, D)
        out = compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)

    return Provider(name, fn)


def _sdpa_padded(lengths: Sequence[int], device: str) -> Provider:
    """SDPA on (num_docs, H, max_len, D): right padding + is_causal keeps every real query exact."""
    num_docs, max_len = len(lengths), max(lengths)
    starts = torch.tensor([0] + list(lengths[:-1]), device=device).cumsum(0)
    lens = torch.tensor(lengths, device=device)
    row = torch.repeat_interleave(torch.arange(num_docs, device=device), lens)
    pos = torch.arange(sum(lengths), device=device) - torch.repeat_interleave(starts, lens)
    slot = row * max_len + pos  # (total,) padded position of each packed token

    def pad(t):
        padded = t.new_zeros(num_docs * max_len, t.shape[1], t.shape[2]).index_copy(0, slot, t)
        return padded.view(num_docs, max_len, t.shape[1], t.shape[2]).transpose(1, 2)

    def fn(inputs):
        q, k, v = (pad(inputs[x]) for x in ("q", "k", "v"))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(num_docs * max_len, q.shape[1], q.shape[3])[slot]

    return Provider("SDPA padded", fn)


def _flash_attn() -> Provider:
    name = "flash_attn_varlen_func"
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as exc:
        return Provider(name, None, reason=f"flash-attn not installed ({type(exc).__name__})")
    if not torch.cuda.is_available():
        return Provider(name, None, reason="needs CUDA")

    def fn(inputs):
        q, k, v, cu, n = (inputs[x] for x in ("q", "k", "v", "cu_seqlens", "max_seqlen"))
        return flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True)

    return Provider(name, fn)


def _per_document_loop(inputs):
    """The previous CPU path: one SDPA call per document (reference.varlen_attention_reference)."""
    from fusedrl.kernels.reference import varlen_attention_reference

    return varlen_attention_reference(inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens"],
                                      inputs["max_seqlen"], causal=True)


def main_cpu(args, cases: List[str]) -> int:
    """--device cpu: fusedrl's batched CPU path vs the per-document loop and padded SDPA, one thread."""
    recipes = {"ATTN-CPU-DEMO": demo_lengths(), "ATTN-CPU-RL": rl_lengths(4096, median=300.0, low=16, high=1024)}
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs
    try:
        for case_id in cases:
            lengths = demo_lengths(160) if args.smoke else recipes[case_id]
            case = make_case(case_id, lengths, 4, 2, 32, torch.float32, "cpu")
            print(f"{case_id}: {len(lengths)} documents, {sum(lengths)} tokens, max {max(lengths)}", file=sys.stderr)
            peers = [Provider("fusedrl varlen (cpu batched)", _ours), Provider("per-document SDPA loop", _per_document_loop),
                     _sdpa_padded(lengths, "cpu")]
            rows += run_case(case, peers, modes=args.modes.split(","))
    finally:
        torch.set_num_threads(threads)
    ok = {(r["case"], r["provider"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    summary = [f"{c} {m}: {r['ms_p50'] / ok[(c, 'per-document SDPA loop', m)]['ms_p50']:.2f}x the per-document loop's time"
               for (c, p, m), r in sorted(ok.items()) if p.startswith("fusedrl") and (c, "per-document SDPA loop", m) in ok]
    return finish("attention-cpu", rows, args, after_table="\n".join(summary))


def providers(lengths: Sequence[int], device: str) -> List[Provider]:
    ours = "fusedrl varlen (triton)" if device == "cuda" else "fusedrl varlen (reference)"
    return [Provider(ours, _ours), _torch_varlen(), _flex(lengths, device), _sdpa_padded(lengths, device),
            _flash_attn()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    all_ids = CASE_IDS + CPU_CASE_IDS
    args, cases = parse_bench_args(bench_arg_parser("bench_attention", __doc__, CASE_IDS), argv, all_ids)
    if args.device == "cpu":
        return main_cpu(args, [c for c in cases if c in CPU_CASE_IDS] or list(CPU_CASE_IDS))
    cases = [c for c in cases if c in CASE_IDS]
    device = bench_device("bench_attention", args.smoke, args.device)
    if device is None:
        return 1
    if args.smoke:
        total, heads, kv_heads, head_dim, dtype = 192, 2, 1, 16, torch.float32
        recipes = {"ATTN-LONG": long_lengths(total), "ATTN-RL": rl_lengths(total, median=16, low=2, high=64)}
    else:
        total, heads, kv_heads, head_dim, dtype = 16384, 32, 8, 128, torch.bfloat16
        recipes = {"ATTN-LONG": long_lengths(total), "ATTN-RL": rl_lengths(total)}
    rows, threads = [], torch.get_num_threads()
    if args.smoke:  # tiny CPU shapes: thread start-up dominates and contends on shared machines
        torch.set_num_threads(1)
    try:
        for case_id in cases:
            lengths = recipes[case_id]
            case = make_case(case_id, lengths, heads, kv_heads, head_dim, dtype, device)
            print(f"{case_id}: {len(lengths)} documents, {sum(lengths)} tokens, max {max(lengths)}", file=sys.stderr)
            rows += run_case(case, providers(lengths, device), modes=args.modes.split(","),
                             ceiling_tflops=matmul_ceiling_tflops(device))
    finally:
        torch.set_num_threads(threads)
    return finish("attention", rows, args)


if __name__ == "__main__":
    raise SystemExit(main())
