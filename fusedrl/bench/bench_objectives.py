"""The RL objectives on CPU: policy_loss, kl_penalty, grpo_advantages vs a plain PyTorch peer.

Cases (fp32, CPU, issue 20's targets: fusedrl <= 1.5x the peer's time, <= 1.2x its memory):
- PL-CPU-64k: `policy_loss(algo="grpo", beta=0.04, kl_kind="k3", aggregation="token_mean")`,
  clip eps 0.2, N = 65536 tokens packed over 64 sequences (lengths from seed 0), one advantage
  per sequence, old and reference log-probs given, the first 16 tokens of each sequence masked
  out; forward and forward + backward. The peer: the same formula written out in PyTorch
  (repeat_interleave of the advantages, exp, clamp, max, k3 as exp(-d) - 1 + d, masked mean).
- KL-CPU-64k: `kl_penalty(kind="k3")` on N = 65536 vs exp(-d) - 1 + d; forward and full.
- ADV-CPU-4096: `grpo_advantages` on 4096 groups of 16 rewards vs (r - mean) / (std + eps) on the
  (4096, 16) view; forward (advantages carry no gradient).

    python -m fusedrl.bench.bench_objectives --device cpu     # writes bench/results/objectives-cpu-*.json
    python -m fusedrl.bench.bench_objectives --smoke          # small shapes, writes nothing

Time: one intra-op thread (at these sizes a second thread's OpenMP spin-waits only add noise
on a shared machine), thread CPU time, the median and minimum of ROUNDS calls after one
warm-up. Memory, in a fresh child process per case (a heap grown by the timings would hide
it): peak resident memory above the start of the call, with glibc told to mmap every block
of 64 KiB or more and trim at once (`mallopt`), so each freed tensor leaves the resident set
and the high-water mark sees each call's live peak
(`common.cpu_peak_extra_bytes`, the minimum of three calls).
"""
from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fusedrl.bench.common import (Case, Provider, _mode_fn, bench_arg_parser, check, cpu_peak_extra_bytes,
                                  finish, parse_bench_args, _float_outputs, _forward_backward, _grad_leaves)
from fusedrl.kernels import grpo_advantages, kl_penalty, policy_loss

CASES = {"PL-CPU-64k": (65536, 64), "KL-CPU-64k": (65536, 0), "ADV-CPU-4096": (4096, 16)}
SMOKE = {"PL-CPU-64k": (4096, 8), "KL-CPU-64k": (4096, 0), "ADV-CPU-4096": (256, 16)}
BETA, EPS, PROMPT = 0.04, 0.2, 16
ROUNDS = 20


def _lengths(n: int, b: int) -> List[int]:
    cuts = torch.randperm(n - 1, generator=torch.Generator().manual_seed(0))[: b - 1].add(1).sort().values
    edges = [0] + cuts.tolist() + [n]
    return [edges[i + 1] - edges[i] for i in range(b)]


def pl_inputs(n: int, b: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor(_lengths(n, b))
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    old = -torch.rand(n, generator=gen) * 3
    logp = (old + 0.3 * torch.randn(n, generator=gen)).requires_grad_()
    ref = old + 0.3 * torch.randn(n, generator=gen)
    pos = torch.arange(n) - cu[:-1].long().repeat_interleave(lengths)
    return {"logp": logp, "old": old, "ref": ref, "adv": torch.randn(b, generator=gen), "mask": pos >= PROMPT,
            "cu": cu, "lengths": lengths}


def pl_fusedrl(i):
    return policy_loss(i["logp"], i["old"], i["adv"], i["mask"], cu_seqlens=i["cu"], algo="grpo", eps_low=EPS,
                       eps_high=EPS, beta=BETA, ref_logp=i["ref"], kl_kind="k3", aggregation="token_mean")[0]


def pl_peer(i):
    logp, mask = i["logp"], i["mask"]
    adv = i["adv"].repeat_interleave(i["lengths"])
    ratio = torch.exp(logp - i["old"])
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - EPS, 1 + EPS))
    d = i["ref"] - logp
    per_token = pg + BETA * (torch.exp(d) - d - 1)
    return torch.where(mask, per_token, 0).sum() / mask.sum().clamp(min=1)


def kl_inputs(n: int, _b: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ref = -torch.rand(n, generator=gen) * 3
    return {"logp": (ref + 0.3 * torch.randn(n, generator=gen)).requires_grad_(), "ref": ref}


def kl_peer(i):
    d = i["ref"] - i["logp"]
    return torch.exp(d) - d - 1


def adv_inputs(groups: int, size: int) -> Dict[str, torch.Tensor]:
    return {"rewards": torch.randn(groups * size, generator=torch.Generator().manual_seed(0)), "g": size}


def adv_peer(i):
    r = i["rewards"].view(-1, i["g"])
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


SPECS = {  # case id: (make_inputs(a, b), fusedrl, peer, modes)
    "PL-CPU-64k": (pl_inputs, pl_fusedrl, pl_peer, ("forward", "full")),
    "KL-CPU-64k": (kl_inputs, lambda i: kl_penalty(i["logp"], i["ref"], "k3"), kl_peer, ("forward", "full")),
    "ADV-CPU-4096": (adv_inputs, lambda i: grpo_advantages(i["rewards"], i["g"]), adv_peer, ("forward",)),
}


def _cpu_time_ms(fn: Callable[[], object], rounds: int) -> tuple:
    fn()
    samples = []
    for _ in range(rounds):
        start = time.thread_time()
        fn()
        samples.append((time.thread_time() - start) * 1e3)
    samples.sort()
    at = lambda q: samples[min(int(q * len(samples)), len(samples) - 1)]  # noqa: E731
    return at(0.5), at(0.2), at(0.8), samples[0]


def mmap_every_block(threshold: int = 1 << 16) -> bool:
    """glibc: serve blocks >= threshold by mmap and trim at once, so RSS follows live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold)) and bool(libc.mallopt(-1, 0))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except OSError:
        return False


def run_objective_case(case_id: str, sizes, rounds: int) -> List[dict]:
    make, ours, peer, modes = SPECS[case_id]
    case = Case(id=case_id, make_inputs=lambda: make(*sizes), reference=peer, tol=1e-4)
    inputs = case.make_inputs()
    ref_out = [t.detach() for t in _float_outputs(peer(inputs))]
    ref_grads = _forward_backward(peer, inputs) if _grad_leaves(inputs) else None
    rows = []
    for p in (Provider("fusedrl", ours), Provider("torch peer", peer)):
        err = check(case, p, inputs, ref_out, ref_grads)
        base = {"case": case_id, "provider": p.name, "max_rel_err": err}
        if not err <= case.tol:
            rows.append({**base, "mode": "-", "status": f"wrong (rel err {err:.2e} > {case.tol:.0e})"})
            continue
        for mode in modes:
            fn = _mode_fn(p, inputs, mode)
            p50, p20, p80, low = _cpu_time_ms(fn, rounds)
            rows.append({**base, "mode": mode, "status": "ok", "ms_p50": p50, "ms_p20": p20, "ms_p80": p80,
                         "cpu_ms_min": low})
    measure_memory(case_id, sizes, rows)
    return rows


def _memory_child(case_id: str, sizes, modes) -> Dict[str, Optional[int]]:
    """In a fresh process (mallopt before any tensor): {provider/mode: min peak extra bytes of 3 calls}."""
    mmap_every_block()
    torch.set_num_threads(1)
    make, ours, peer, _ = SPECS[case_id]
    inputs, out = make(*sizes), {}
    for name, fn in (("fusedrl", ours), ("torch peer", peer)):
        for mode in modes:
            run = _mode_fn(Provider(name, fn), inputs, mode)
            run()
            mems = [cpu_peak_extra_bytes(run) for _ in range(3)]
            out[f"{name}/{mode}"] = None if None in mems else min(mems)
    return out


def measure_memory(case_id: str, sizes, rows: List[dict]) -> None:
    """Each row's peak_extra_bytes, from a child process: a heap grown by the timings would hide it."""
    modes = sorted({r["mode"] for r in rows if r["status"] == "ok"})
    code = ("import json, sys; from fusedrl.bench.bench_objectives import _memory_child; "
            f"print(json.dumps(_memory_child({case_id!r}, {tuple(sizes)!r}, {modes!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    found = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    for r in rows:
        if r["status"] == "ok":
            r["peak_extra_bytes"] = found.get(f"{r['provider']}/{r['mode']}")


def summary(rows: Sequence[dict]) -> str:
    peers = {(r["case"], r["mode"]): r for r in rows if r["provider"] == "torch peer" and r["status"] == "ok"}
    lines = []
    for r in rows:
        peer = peers.get((r["case"], r["mode"]))
        if r["provider"] != "fusedrl" or r["status"] != "ok" or peer is None:
            continue
        line = f"{r['case']} {r['mode']}: time {r['cpu_ms_min'] / max(peer['cpu_ms_min'], 1e-9):.2f}x peer (min CPU ms " \
               f"{r['cpu_ms_min']:.2f} vs {peer['cpu_ms_min']:.2f})"
        if r.get("peak_extra_bytes") and peer.get("peak_extra_bytes"):
            line += f", memory {r['peak_extra_bytes'] / peer['peak_extra_bytes']:.2f}x peer " \
                    f"({r['peak_extra_bytes'] / 2**20:.2f} vs {peer['peak_extra_bytes'] / 2**20:.2f} MiB)"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bench_arg_parser("bench_objectives", __doc__, CASES)
    args, cases = parse_bench_args(parser, argv, CASES)
    if args.device == "cuda":
        print("bench_objectives: CPU cases only (the GPU objectives run inside bench_grpo)")
        return 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: List[dict] = []
    for case_id in cases:
        sizes = (SMOKE if args.smoke else CASES)[case_id]
        print(f"{case_id}: sizes {sizes}, float32 on cpu, 1 thread", file=sys.stderr)
        rows += run_objective_case(case_id, sizes, 3 if args.smoke else ROUNDS)
    torch.set_num_threads(threads)
    return finish("objectives-cpu", rows, args, extra={"threads": 1},
                  after_table=summary(rows), is_failure=lambda r: r["status"] != "ok")


if __name__ == "__main__":
    raise SystemExit(main())
