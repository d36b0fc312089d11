"""GRPO loss from final hidden states, fwd+bwd: fusedrl vs the unfused eager path vs Liger.

Cases (bench/NOTES.md): GRPO-7B (B=8, T=2048, H=4096, V=151936) and GRPO-0.5B
(B=32, T=1024, H=896, V=151936), bf16 hidden states and LM head; beta = 0.04,
k3 KL to the reference, eps 0.2 (clipped surrogate), token_mean, reference and
old log-probs given, one advantage per sequence, every completion token trained.

Providers:
- fusedrl `linear_policy_loss` (the LM head inside the log-prob kernel, no logits);
- unfused eager: bf16 logits = h @ W.T, row-looped selective log-softmax (the TRL
  approach), k3, clipped ratio, masked mean, in PyTorch;
- TRL 1.16's path: its chunked, logits-free log-prob head (`trl.kernels.ChunkedLogProbFunction`,
  fusedrl/bench/peers.py), then the same objective in PyTorch;
- Liger `LigerFusedLinearGRPOLoss(loss_type="bnpo")` (token mean), skipped with a
  message when liger-kernel is not importable.
The reference: the same loss in float32 from float32 logits, computed in row
chunks under activation checkpointing so it fits beside the others.

    python -m fusedrl.bench.bench_grpo                      # both cases on the GPU, writes bench/results/grpo-*.json
    python -m fusedrl.bench.bench_grpo --cases GRPO-0.5B
    python -m fusedrl.bench.bench_grpo --smoke              # tiny fp32 shapes on CPU, writes nothing

Targets: time <= 0.1x Liger and <= 1.0x unfused eager; peak extra memory <= 1 GiB.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fusedrl.bench.common import (Case, Provider, bench_arg_parser, bench_device, finish, matmul_ceiling_tflops,
                          parse_bench_args, run_case)

CASE_SHAPES = {"GRPO-7B": (8, 2048, 4096, 151936), "GRPO-0.5B": (32, 1024, 896, 151936)}
CASE_IDS = tuple(CASE_SHAPES)
SMOKE_SHAPE = (3, 16, 32, 101)
BETA, EPS = 0.04, 0.2
REF_CHUNK = 2048  # rows of fp32 logits per checkpointed chunk of the reference


def _ref_logp(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 log p(label), (B, T), one row chunk of logits at a time (checkpointed: no (N, V) kept)."""
    def chunk(h, w, y):
        logits = h.float() @ w.float().T
        return logits.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)

    h2, y1 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    parts = [checkpoint(chunk, h2[i:i + REF_CHUNK], weight, y1[i:i + REF_CHUNK], use_reentrant=False)
             for i in range(0, h2.shape[0], REF_CHUNK)]
    return torch.cat(parts).view(labels.shape)


def _grpo_from_logp(logp, old, ref, adv, mask):
    """The GRPO objective on per-token log-probs (fp32): clipped surrogate + beta k3, token mean."""
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    pg = -torch.min(ratio * a, ratio.clamp(1 - EPS, 1 + EPS) * a)
    d = logp - ref
    per_token = pg + BETA * (torch.exp(-d) - 1 + d)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def reference(inp: Dict) -> torch.Tensor:
    logp = _ref_logp(inp["hidden"], inp["weight"], inp["labels"])
    return _grpo_from_logp(logp, inp["old"], inp["ref"], inp["adv"], inp["mask"])


def make_inputs_fn(shape, dtype, device):
    b, t, h, v = shape

    def make() -> Dict:
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(b, t, h, generator=g, device=device, dtype=torch.float32).to(dtype)
        weight = (torch.randn(v, h, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)
        labels = torch.randint(0, v, (b, t), generator=g, device=device)
        with torch.no_grad():
            logp = _ref_logp(hidden, weight, labels)
        # old / ref near the current policy so ratios are realistic (a few tokens clip)
        old = logp + 0.1 * torch.randn(b, t, generator=g, device=device)
        ref = logp + 0.1 * torch.randn(b, t, generator=g, device=device)
        adv = torch.randn(b, generator=g, device=device)
        mask = torch.ones(b, t, dtype=torch.long, device=device)
        return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(), "labels": labels,
                "old": old, "ref": ref, "adv": adv, "mask": mask}
    return make


def ours(inp: Dict) -> torch.Tensor:
    from fusedrl.kernels import linear_policy_loss

    loss, _ = linear_policy_loss(inp["hidden"], inp["weight"], inp["labels"], inp["old"], inp["adv"], inp["mask"],
                                 algo="grpo", eps_low=EPS, eps_high=EPS, ref_logp=inp["ref"], beta=BETA,
                                 kl_kind="k3", aggregation="token_mean")
    return loss


def eager(inp: Dict) -> torch.Tensor:
    """Unfused: logits in the model dtype, then a row-looped selective log-softmax (TRL's)."""
    logits = inp["hidden"] @ inp["weight"].T  # (B, T, V) in bf16
    rows = []
    for row_logits, row_labels in zip(logits, inp["labels"]):
        row_logp = F.log_softmax(row_logits, dim=-1)
        rows.append(row_logp.gather(-1, row_labels[:, None]).squeeze(-1))
    logp = torch.stack(rows).float()
    return _grpo_from_logp(logp, inp["old"], inp["ref"], inp["adv"], inp["mask"])


def liger_provider() -> Provider:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as exc:  # absent or broken install
        return Provider("liger FusedLinearGRPOLoss", None, reason=f"liger-kernel not importable ({type(exc).__name__})")
    if not torch.cuda.is_available():
        return Provider("liger FusedLinearGRPOLoss", None, reason="liger needs a CUDA device")
    loss_fn = LigerFusedLinearGRPOLoss(beta=BETA, epsilon_low=EPS, epsilon_high=EPS, loss_type="bnpo",
                                       use_ref_model=True)

    def run(inp: Dict) -> torch.Tensor:
        out = loss_fn(inp["hidden"], inp["weight"], inp["labels"], inp["mask"], inp["adv"],
                      ref_per_token_logps=inp["ref"], old_per_token_logps=inp["old"])
        return out[0] if isinstance(out, (tuple, list)) else out
    return Provider("liger FusedLinearGRPOLoss", run)


def trl_provider() -> Provider:
    """TRL 1.16's path: its chunked, logits-free log-prob head, then the same GRPO objective in PyTorch."""
    from fusedrl.bench.peers import trl_chunked_logp

    logp, version = trl_chunked_logp()
    name = "trl chunked head + eager loss"
    if logp is None:
        return Provider(name, None, reason=version)

    def run(inp: Dict) -> torch.Tensor:
        return _grpo_from_logp(logp(inp["hidden"], inp["weight"], inp["labels"]).float(), inp["old"], inp["ref"],
                               inp["adv"], inp["mask"])
    return Provider(f"{name} ({version})", run)


def make_case(case_id: str, shape, dtype, device) -> Case:
    b, t, h, v = shape
    n = b * t
    return Case(id=case_id, make_inputs=make_inputs_fn(shape, dtype, device), reference=reference,
                flops={"forward": 2.0 * n * h * v, "full": 6.0 * n * h * v}, tol=3e-2)


def providers(device: str) -> List[Provider]:
    name = "fusedrl linear_policy_loss" + (" (triton)" if device == "cuda" else " (reference)")
    return [Provider(name, ours), Provider("unfused eager (bf16 logits)", eager), trl_provider(), liger_provider()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, cases = parse_bench_args(bench_arg_parser("bench_grpo", __doc__, CASE_IDS), argv, CASE_IDS)
    if args.device == "cpu" and not args.smoke:
        print("bench_grpo: no CPU cases yet (the CPU linear_logprobs cases are in bench_logprobs --device cpu)")
        return 0
    device = bench_device("bench_grpo", args.smoke, args.device)
    if device is None:
        return 1
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rows = []
    for case_id in cases:
        shape = SMOKE_SHAPE if args.smoke else CASE_SHAPES[case_id]
        print(f"{case_id}: B, T, H, V = {shape}, {dtype}, {device}", file=sys.stderr)
        rows += run_case(make_case(case_id, shape, dtype, device), providers(device), modes=args.modes.split(","),
                         ceiling_tflops=matmul_ceiling_tflops(device))
    return finish("grpo", rows, args)


if __name__ == "__main__":
    raise SystemExit(main())
