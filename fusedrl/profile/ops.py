"""The ops `fusedrl profile OP` knows: their shape keys, default and smoke shapes, inputs and providers.

Each op reuses its benchmark's inputs, exact reference and peers (fusedrl/bench/bench_*.py), at
the shape and dtype the user gives:

    linear_logprobs      N (tokens), H (hidden), V (vocab)         peers: eager (logits in the input
                         dtype; and fp32 logits), TRL's chunked head, Liger FLCE, CCE
    linear_policy_loss   B (sequences), T (tokens each), H, V      GRPO, k3 KL, token mean; peers:
                                                                   unfused eager (row-looped log-
                                                                   softmax), TRL's chunked head + the
                                                                   loss in PyTorch, Liger GRPO loss
    linear_distill_loss  N, H, V                                   reverse KL; peers: eager, Liger JSD
    policy_loss          N (tokens), B (sequences)                 GRPO on per-token log-probs; eager
    kl                   N                                         k3; eager
    varlen_attention     T (tokens), HQ, HKV, D, L (median doc     causal, packed; peers: torch
                         length, log-normal as ATTN-RL)             varlen_attn, FlexAttention, SDPA
                                                                   padded, flash-attn
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from fusedrl.bench.common import Case, Provider
from fusedrl.bench.peers import trl_chunked_provider

Shape = Dict[str, int]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


@dataclass
class OpSpec:
    """One profilable op: `build(shape, dtype, device) -> (Case, providers)`; providers[0] is fusedrl."""

    name: str
    keys: Tuple[str, ...]
    default: Shape
    smoke: Shape
    build: Callable[[Shape, torch.dtype, str], Tuple[Case, List[Provider]]]


def _tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def _matmul_flops(n: int, h: int, v: int, matmuls_forward: int = 1) -> Dict[str, float]:
    fwd = 2.0 * n * h * v * matmuls_forward
    return {"forward": fwd, "backward": 2.0 * fwd, "full": 3.0 * fwd}


def _linear_logprobs(s: Shape, dtype: torch.dtype, device: str):
    from fusedrl.bench import bench_logprobs as bl

    n, h, v = s["N"], s["H"], s["V"]
    case = Case(id="linear_logprobs", make_inputs=lambda: bl.make_inputs(n, h, v, device, dtype),
                reference=bl.reference, flops=_matmul_flops(n, h, v), tol=_tol(dtype))
    providers = [Provider("fusedrl", bl.ours), Provider(f"eager ({_short(dtype)} logits)", bl.eager(None))]
    if dtype != torch.float32:
        providers.append(Provider("eager (fp32 logits)", bl.eager(torch.float32)))
    return case, providers + [trl_chunked_provider()] + bl.peers(device)


def _linear_policy_loss(s: Shape, dtype: torch.dtype, device: str):
    from fusedrl.bench import bench_grpo as bg

    b, t, h, v = s["B"], s["T"], s["H"], s["V"]
    case = Case(id="linear_policy_loss", make_inputs=bg.make_inputs_fn((b, t, h, v), dtype, device),
                reference=bg.reference, flops=_matmul_flops(b * t, h, v), tol=max(_tol(dtype), 1e-3))
    return case, [Provider("fusedrl", bg.ours), Provider("unfused eager", bg.eager), bg.trl_provider(),
                  bg.liger_provider()]


def _linear_distill_loss(s: Shape, dtype: torch.dtype, device: str):
    from fusedrl.bench import bench_distill as bd

    n, h, v = s["N"], s["H"], s["V"]
    flops = {"forward": 4.0 * n * h * v, "backward": 4.0 * n * h * v, "full": 8.0 * n * h * v}
    case = Case(id="linear_distill_loss", make_inputs=lambda: bd.make_inputs(n, h, v, device, dtype),
                reference=bd.reference, flops=flops, tol=_tol(dtype))
    return case, [Provider("fusedrl", bd.ours), Provider("eager", bd.eager)] + bd.peers(device)


def _moved(inputs: Dict, device: str, dtype: torch.dtype) -> Dict:
    """CPU float32 inputs -> device and dtype; leaves that took grad are fresh leaves again."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            grad = value.requires_grad
            value = value.detach().to(device, dtype if value.is_floating_point() else value.dtype)
            value = value.requires_grad_(grad)
        out[key] = value
    return out


def _float64(inputs: Dict) -> Dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def _policy_loss(s: Shape, dtype: torch.dtype, device: str):
    from fusedrl.bench import bench_objectives as bo

    n, b = s["N"], s["B"]
    if not 1 <= b <= n:
        raise ValueError(f"--shape: policy_loss needs 1 <= B <= N, got N={n}, B={b}")
    case = Case(id="policy_loss", make_inputs=lambda: _moved(bo.pl_inputs(n, b), device, dtype),
                reference=lambda i: bo.pl_peer(_float64(i)), tol=_tol(dtype))
    return case, [Provider("fusedrl", bo.pl_fusedrl), Provider("eager", bo.pl_peer)]


def _kl(s: Shape, dtype: torch.dtype, device: str):
    from fusedrl.bench import bench_objectives as bo
    from fusedrl.kernels import kl_penalty

    n = s["N"]
    case = Case(id="kl", make_inputs=lambda: _moved(bo.kl_inputs(n, 0), device, dtype),
                reference=lambda i: bo.kl_peer(_float64(i)), tol=_tol(dtype))
    return case, [Provider("fusedrl", lambda i: kl_penalty(i["logp"], i["ref"], "k3")), Provider("eager", bo.kl_peer)]


def _varlen_attention(s: Shape, dtype: torch.dtype, device: str):
    from fusedrl.bench import bench_attention as ba

    total, hq, hkv, d, median = s["T"], s["HQ"], s["HKV"], s["D"], s["L"]
    if hq % hkv:
        raise ValueError(f"--shape: varlen_attention needs HQ divisible by HKV, got HQ={hq}, HKV={hkv}")
    lengths = ba.rl_lengths(total, median=float(median), low=max(1, median // 16), high=max(2, 8 * median))
    case = ba.make_case("varlen_attention", lengths, hq, hkv, d, dtype, device)
    case.flops = {**case.flops, "backward": case.flops["full"] - case.flops["forward"]}
    case.tol = _tol(dtype)
    providers = ba.providers(lengths, device)
    providers[0] = Provider("fusedrl", providers[0].fn)
    return case, providers


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


OPS: Dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("linear_logprobs", ("N", "H", "V"), {"N": 8192, "H": 896, "V": 151936}, {"N": 40, "H": 24, "V": 1000},
           _linear_logprobs),
    OpSpec("linear_policy_loss", ("B", "T", "H", "V"), {"B": 8, "T": 1024, "H": 896, "V": 151936},
           {"B": 3, "T": 16, "H": 32, "V": 101}, _linear_policy_loss),
    OpSpec("linear_distill_loss", ("N", "H", "V"), {"N": 8192, "H": 896, "V": 151936}, {"N": 40, "H": 24, "V": 1000},
           _linear_distill_loss),
    OpSpec("policy_loss", ("N", "B"), {"N": 65536, "B": 64}, {"N": 4096, "B": 8}, _policy_loss),
    OpSpec("kl", ("N",), {"N": 65536}, {"N": 4096}, _kl),
    OpSpec("varlen_attention", ("T", "HQ", "HKV", "D", "L"), {"T": 16384, "HQ": 32, "HKV": 8, "D": 128, "L": 300},
           {"T": 192, "HQ": 2, "HKV": 1, "D": 16, "L": 16}, _varlen_attention),
)}


def parse_shape(spec: OpSpec, text: str, smoke: bool = False) -> Shape:
    """"N=4096,H=896" (keys of the op, any subset; the rest default) or "4096x896x151936" (all, in order)."""
    shape = dict(spec.smoke if smoke else spec.default)
    text = (text or "").strip()
    if not text:
        return shape
    if "=" not in text:
        parts = text.lower().split("x")
        if len(parts) != len(spec.keys):
            raise ValueError(f"--shape: {spec.name} takes {len(spec.keys)} sizes {'x'.join(spec.keys)}, got {text!r}")
        pairs = list(zip(spec.keys, parts))
    else:
        pairs = [tuple(p.split("=", 1)) for p in text.split(",") if p.strip()]
    for key, value in pairs:
        key = key.strip().upper()
        if key not in spec.keys:
            raise ValueError(f"--shape: {spec.name} has no size {key!r}; its sizes are {spec.keys}")
        try:
            shape[key] = int(str(value).strip())
        except ValueError:
            raise ValueError(f"--shape: {key} must be an integer, got {value!r}") from None
        if shape[key] < 1:
            raise ValueError(f"--shape: {key} must be >= 1, got {shape[key]}")
    return shape


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {text!r}") from None
