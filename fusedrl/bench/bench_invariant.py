"""Invariant mode vs the default mode, same run: time ratio and how many numbers move with the layout.

    python -m fusedrl.bench.bench_invariant                  # GPU: LP-7B, ATTN-RL, ROLLOUT-0.5B, STEP-0.5B
    python -m fusedrl.bench.bench_invariant --device cpu     # the CPU variants (LP-CPU, ATTN-CPU, ...)
    python -m fusedrl.bench.bench_invariant --smoke          # tiny shapes, checks the bench code

Per case, each mode is timed (median of repeats) and checked:
- LP: `linear_logprobs` forward + backward (random fp32 upstream) of N tokens; `moved` is the
  fraction of tokens whose log-prob differs when the batch is split in two unequal launches.
- ATTN: `varlen_attention` forward + backward of RL-like document lengths; `moved` as above
  (outputs of the first documents, computed in a pack of their own).
- ROLLOUT: the native engine generating; `moved` is the fraction of sampled tokens whose sampler
  log-prob differs from the trainer's recompute (`token_logprobs`): ratio_ne_1_frac at step 0.
- STEP: one policy-gradient training step (packed forward, fused log-probs, masked mean, backward).
Invariant mode must give moved = 0 on every case; the goal on GPU is <= 1.15x the default time.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fusedrl.bench.common import device_info, write_results
from fusedrl.kernels import linear_logprobs, varlen_attention
from fusedrl.kernels.invariant import invariant
from fusedrl.kernels.invariant_attention import invariant_varlen_attention

QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
TINY = dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
SMOKE_MODEL = dict(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
# id: (kind, device, dtype, shape parameters)
CASES = {
    "LP-7B": ("lp", "cuda", torch.bfloat16, dict(n=16384, h=4096, v=151936)),
    "ATTN-RL": ("attn", "cuda", torch.bfloat16, dict(total=16384, heads=32, kv=8, dim=128, median=300, low=16,
                                                     high=4096)),
    "ROLLOUT-0.5B": ("rollout", "cuda", torch.bfloat16, dict(model=QWEN_05B, prompts=64, length=128, new=256)),
    "STEP-0.5B": ("step", "cuda", torch.bfloat16, dict(model=QWEN_05B, seqs=16, low=256, high=2048)),
    "LP-CPU": ("lp", "cpu", torch.float32, dict(n=2048, h=256, v=8192)),
    "ATTN-CPU": ("attn", "cpu", torch.float32, dict(total=2048, heads=4, kv=2, dim=32, median=64, low=4, high=256)),
    "ROLLOUT-CPU": ("rollout", "cpu", torch.float32, dict(model=TINY, prompts=8, length=32, new=32)),
    "STEP-CPU": ("step", "cpu", torch.float32, dict(model=TINY, seqs=8, low=32, high=128)),
}
GPU_CASES = ("LP-7B", "STEP-0.5B", "ATTN-RL", "ROLLOUT-0.5B")  # the slowest (invariant rollout) last
CPU_CASES = ("LP-CPU", "ATTN-CPU", "ROLLOUT-CPU", "STEP-CPU")
SMOKE = {"lp": dict(n=70, h=24, v=301), "attn": dict(total=96, heads=2, kv=1, dim=8, median=12, low=2, high=40),
         "rollout": dict(model=SMOKE_MODEL, prompts=3, length=5, new=4),
         "step": dict(model=SMOKE_MODEL, seqs=3, low=4, high=12)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median milliseconds of `repeats` calls after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def rl_lengths(total: int, median: float, low: int, high: int) -> List[int]:
    rng, out = random.Random(0), []
    while sum(out) < total:
        out.append(int(min(max(rng.lognormvariate(torch.tensor(median).log().item(), 0.9), low), high)))
    out[-1] -= sum(out) - total
    return [n for n in out if n > 0]


def _lp_case(p, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(p["n"], p["h"], generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(p["v"], p["h"], generator=g) * 0.05).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, p["v"], (p["n"],), generator=g).to(device)
    upstream = torch.randn(p["n"], generator=g).to(device)

    def step():
        torch.autograd.grad((linear_logprobs(hidden, weight, labels) * upstream).sum(), (hidden, weight))

    def moved():
        with torch.no_grad():
            whole = linear_logprobs(hidden, weight, labels)
            cut = p["n"] // 3
            parts = torch.cat([linear_logprobs(hidden[:cut], weight, labels[:cut]),
                               linear_logprobs(hidden[cut:], weight, labels[cut:])])
        return (whole != parts).float().mean().item()
    return step, moved


def _attn_case(p, device, dtype):
    lengths = rl_lengths(p["total"], p["median"], p["low"], p["high"])
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(p["total"], p["heads"], p["dim"], generator=g).to(device, dtype).requires_grad_(True)
    k = torch.randn(p["total"], p["kv"], p["dim"], generator=g).to(device, dtype).requires_grad_(True)
    v = torch.randn(p["total"], p["kv"], p["dim"], generator=g).to(device, dtype).requires_grad_(True)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    scale = p["dim"] ** -0.5

    def attend(qq, kk, vv, cu_seqlens, longest):
        from fusedrl.kernels.invariant import is_invariant
        if is_invariant():
            return invariant_varlen_attention(qq, kk, vv, cu_seqlens, scale)
        return varlen_attention(qq, kk, vv, cu_seqlens, longest, causal=True, softmax_scale=scale)

    def step():
        out = attend(q, k, v, cu, max(lengths))
        torch.autograd.grad(out.float().sum(), (q, k, v))

    def moved():
        first = len(lengths) // 2
        end = sum(lengths[:first])
        with torch.no_grad():
            whole = attend(q, k, v, cu, max(lengths))[:end]
            alone = attend(q[:end], k[:end], v[:end], cu[:first + 1], max(lengths[:first]))
        return (whole != alone).float().mean().item()
    return step, moved


def _model(arch, device, dtype):
    from fusedrl.models.causal_lm import build_model

    torch.manual_seed(0)
    return build_model(config={"model_type": "qwen2", "max_position_embeddings": 4096, **arch}, dtype=dtype,
                       device=device)


def _packed(docs, device):
    from fusedrl.data.batch import PackedBatch

    ids, labels, pos, cu = [], [], [], [0]
    for doc in docs:
        ids, labels, pos = ids + doc, labels + doc[1:] + [-100], pos + list(range(len(doc)))
        cu.append(cu[-1] + len(doc))
    return PackedBatch(input_ids=torch.tensor(ids), labels=torch.tensor(labels), position_ids=torch.tensor(pos),
                       cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(map(len, docs)),
                       num_tokens=sum(len(d) - 1 for d in docs)).to(device)


def _rollout_case(p, device, dtype):
    from fusedrl.models.causal_lm import token_logprobs
    from fusedrl.rollout.native import EngineConfig, NativeEngine
    from fusedrl.rollout.sampling import SamplingParams

    model = _model(p["model"], device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, p["model"]["vocab_size"], (p["prompts"], p["length"]), generator=g).tolist()
    engine = NativeEngine(model, config=EngineConfig(block_size=16, max_num_batched_tokens=8192))
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=p["new"], seed=0)
    latest = {}

    def step():
        latest["groups"] = engine.generate(prompts, params)

    def moved():
        step()
        docs = [pr + grp[0].token_ids for pr, grp in zip(prompts, latest["groups"])]
        with torch.no_grad():
            logp = token_logprobs(model, _packed(docs, device)).cpu()
        ends = torch.tensor([len(d) for d in docs]).cumsum(0).tolist()
        trainer = torch.cat([logp[e - 1 - len(grp[0].logprobs):e - 1] for e, grp in zip(ends, latest["groups"])])
        sampler = torch.tensor([x for grp in latest["groups"] for x in grp[0].logprobs], dtype=torch.float32)
        return (trainer.float() != sampler).float().mean().item()
    return step, moved


def _step_case(p, device, dtype):
    from fusedrl.models.causal_lm import hidden_states, lm_head

    model = _model(p["model"], device, dtype)
    rng = random.Random(1)
    docs = [[rng.randrange(p["model"]["vocab_size"]) for _ in range(rng.randint(p["low"], p["high"]))]
            for _ in range(p["seqs"])]
    batch = _packed(docs, device)
    adv = torch.randn(batch.labels.shape, generator=torch.Generator().manual_seed(2)).to(device)

    def step():
        weight, bias = lm_head(model)
        logp = linear_logprobs(hidden_states(model, batch), weight, batch.labels, bias=bias)
        loss = -(logp * adv * (batch.labels != -100)).sum() / batch.num_tokens
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step, None


BUILDERS = {"lp": _lp_case, "attn": _attn_case, "rollout": _rollout_case, "step": _step_case}


def run_case(case_id: str, smoke: bool, repeats: int) -> Dict[str, object]:
    kind, device, dtype, params = CASES[case_id]
    if smoke:
        device, dtype, params = "cpu", torch.float32, SMOKE[kind]
    step, moved = BUILDERS[kind](params, device, dtype)
    row: Dict[str, object] = {"case": case_id, "device": device, "dtype": str(dtype).replace("torch.", "")}
    for mode in (False, True):
        name = "invariant" if mode else "default"
        with invariant(mode):
            row[f"{name}_ms"] = round(_time(step, device, repeats), 3)
            row[f"{name}_moved"] = None if moved is None else moved()
    row["ratio"] = round(row["invariant_ms"] / row["default_ms"], 3)
    row["status"] = "ok" if row["invariant_moved"] in (None, 0.0) else "FAILED: invariant mode moved"
    return row


def format_rows(rows: Sequence[dict]) -> str:
    head = f"{'case':<13} {'device':<6} {'dtype':<9} {'default ms':>11} {'invariant ms':>13} {'ratio':>6} " \
           f"{'moved (def)':>12} {'moved (inv)':>12}  status"
    lines = [head, "-" * len(head)]
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    for r in rows:
        lines.append(f"{r['case']:<13} {r['device']:<6} {r['dtype']:<9} {r['default_ms']:>11.2f} "
                     f"{r['invariant_ms']:>13.2f} {r['ratio']:>6.2f} {fmt(r['default_moved']):>12} "
                     f"{fmt(r['invariant_moved']):>12}  {r['status']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_invariant", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU, no result file")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: the GPU cases on CUDA, else the CPU cases")
    parser.add_argument("--cases", default="", help=f"comma-separated subset of {tuple(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results-dir", default=None, help="where to write JSON (default bench/results)")
    parser.add_argument("--modes", default="full", help="accepted for run_all's shared flags; always fwd+bwd")
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available() and not args.smoke)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] or list(GPU_CASES if on_gpu else CPU_CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {tuple(CASES)}")
    if not args.smoke and any(CASES[c][1] == "cuda" for c in cases) and not torch.cuda.is_available():
        print("bench_invariant: the GPU cases need CUDA; use --device cpu or --smoke")
        return 0
    rows = []
    for case_id in cases:  # one line per case as it finishes: a time limit still leaves the earlier rows
        rows.append(run_case(case_id, args.smoke, 1 if args.smoke else args.repeats))
        print("bench_invariant:", rows[-1], flush=True)
    print(format_rows(rows))
    if not args.smoke or args.results_dir:
        directory = {"directory": args.results_dir} if args.results_dir else {}
        print("wrote", write_results("invariant", rows, extra={"smoke": args.smoke, **device_info()}, **directory))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
