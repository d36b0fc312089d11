"""Rollout throughput: the native engine vs transformers `generate` (and vLLM when installed).

Cases (bench/NOTES.md): ROLLOUT-0.5B (Qwen2-0.5B shapes, random init, bf16, 64 prompts of 128
random tokens, n = 1, 256 new tokens), ROLLOUT-G8 (the same with n = 8: prefix sharing) on a GPU;
ROLLOUT-CPU (the G8 pattern on a ~30M-parameter Qwen2-shaped model in float32 on the CPU:
16 prompts of 128 tokens x 8 samples, 64 new tokens). Sampling at temperature 1, no top-k /
top-p, no stop token: every completion runs to its full length.

Providers: fusedrl native (`fusedrl.rollout.native.NativeEngine`); fusedrl hf (the `hf` rollout
backend, `fusedrl.rollout.hf.HFSampler`, the correctness oracle); transformers `generate`
(`do_sample=True`, no top-k, `num_return_sequences=n`, dynamic cache, SDPA); vLLM (`LLM.generate`
on the same weights saved to a temporary folder, `ignore_eos`) when importable, else a skipped row.
Each provider is first checked: its greedy first token must agree with the model's own argmax on
every prompt (>= 90% in bf16), and its completions must have the full length. Then one warm-up
and `--repeats` timed runs; the row gives the median ms and new tokens/s, and the summary the
ratio to `generate`, by wall time and by this process's CPU time (`cpu_s_p50`, `tokens_per_cpu_s`,
`x_generate_cpu`): on a CPU shared with other jobs, the wall time of one provider depends on the
share of the cores it got while it ran, while with `--threads 1` the CPU time is the work done.

    python -m fusedrl.bench.bench_rollout                       # every case this machine can run; writes JSON
    python -m fusedrl.bench.bench_rollout --cases ROLLOUT-CPU   # the CPU case (about a minute on 2 cores)
    python -m fusedrl.bench.bench_rollout --smoke               # tiny model on the CPU, writes nothing

Targets: ROLLOUT-0.5B / G8 >= 5x `generate` and >= 0.8x vLLM; ROLLOUT-CPU >= 2x `generate`.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fusedrl.bench.common import bench_arg_parser, finish, parse_bench_args

CASES = {  # id: (device, dtype, model shape, prompts, prompt length, n, new tokens)
    "ROLLOUT-0.5B": ("cuda", torch.bfloat16, "0.5B", 64, 128, 1, 256),
    "ROLLOUT-G8": ("cuda", torch.bfloat16, "0.5B", 64, 128, 8, 256),
    "ROLLOUT-CPU": ("cpu", torch.float32, "30M", 16, 128, 8, 64),
}
CASE_IDS = tuple(CASES)
SHAPES = {  # Qwen2 configs; 0.5B = Qwen2.5-0.5B's
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "30M": dict(vocab_size=16384, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
SMOKE_CASE = ("cpu", torch.float32, "smoke", 4, 12, 2, 8)


def build_model(shape: str, dtype: torch.dtype, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(max_position_embeddings=4096, rope_theta=1000000.0, **SHAPES[shape])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.top_k = None  # no truncation (transformers would default to 50)
    return model


def make_prompts(count: int, length: int, vocab: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (count, length), generator=g).tolist()


def native_provider(model, case) -> Callable:
    from fusedrl.rollout.native import EngineConfig, NativeEngine
    from fusedrl.rollout.sampling import SamplingParams

    engine = NativeEngine(model, config=EngineConfig(block_size=16, max_num_batched_tokens=8192, max_num_seqs=512))

    def run(prompts, n, new, greedy=False):
        params = SamplingParams(n=n, temperature=0.0 if greedy else 1.0, max_new_tokens=new, seed=0)
        return [[c.token_ids for c in g] for g in engine.generate(prompts, params)]
    return run


def hf_provider(model, case) -> Callable:
    """fusedrl's `hf` rollout backend (the correctness oracle: a left-padded batch over a KV cache)."""
    from fusedrl.rollout.hf import HFSampler
    from fusedrl.rollout.sampling import SamplingParams

    sampler = HFSampler(model)

    def run(prompts, n, new, greedy=False):
        params = SamplingParams(n=n, temperature=0.0 if greedy else 1.0, max_new_tokens=new, seed=0)
        return [[c.token_ids for c in g] for g in sampler.generate(prompts, params)]
    return run


def generate_provider(model, case) -> Callable:
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(prompts, n, new, greedy=False):
        ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=not greedy, temperature=1.0,
                             top_p=1.0, num_return_sequences=n, max_new_tokens=new, min_new_tokens=new)
        rows = out[:, ids.shape[1]:].tolist()
        return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]
    return run


def vllm_provider(model, case) -> Optional[Callable]:
    try:
        import vllm
    except Exception:
        return None
    folder = tempfile.mkdtemp(prefix="fusedrl-rollout-")
    model.save_pretrained(folder)
    llm = vllm.LLM(model=folder, skip_tokenizer_init=True, dtype=str(case[1]).replace("torch.", ""),
                   gpu_memory_utilization=0.4, seed=0)

    def run(prompts, n, new, greedy=False):
        params = vllm.SamplingParams(n=n, temperature=0.0 if greedy else 1.0, max_tokens=new, min_tokens=new,
                                     ignore_eos=True, seed=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[list(c.token_ids) for c in o.outputs] for o in outs]
    return run


def check(run, model, prompts, n, new, dtype) -> Optional[str]:
    """None when the provider is right: greedy first tokens agree with argmax, full-length completions."""
    device = next(model.parameters()).device
    with torch.no_grad():
        want = model(torch.tensor(prompts, device=device)).logits[:, -1].argmax(-1).tolist()
    got = [g[0][0] for g in run(prompts, 1, 1, greedy=True)]
    agree = sum(a == b for a, b in zip(got, want)) / len(want)
    if agree < (0.9 if dtype != torch.float32 else 1.0):
        return f"wrong (greedy first token agrees on {agree:.0%} of prompts)"
    lengths = {len(c) for g in run(prompts[:2], n, new) for c in g}
    if lengths != {new}:
        return f"wrong (completion lengths {sorted(lengths)} != {new})"
    return None


def time_provider(run, prompts, n, new, repeats: int, cpu_times: Optional[List[float]] = None) -> List[float]:
    """Wall ms per timed run; also appends this process's CPU seconds per run to `cpu_times` (on a shared
    CPU with one thread, the CPU time is the work done whatever share of the cores the run got)."""
    run(prompts[:2], n, 4)  # warm-up: compiles, graph capture, allocator
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        run(prompts, n, new)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu)
    return samples


def run_rollout_case(case_id: str, case, repeats: int) -> List[dict]:
    device, dtype, shape, count, length, n, new = case
    base = {"case": case_id, "mode": "generate"}
    if device == "cuda" and not torch.cuda.is_available():
        return [{**base, "provider": "all", "status": "skipped: needs a CUDA device"}]
    model = build_model(shape, dtype, device)
    prompts = make_prompts(count, length, model.config.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    makers = [("fusedrl native", native_provider), ("fusedrl hf", hf_provider),
              ("transformers generate", generate_provider)]
    if device == "cuda":
        makers.append(("vLLM", vllm_provider))
    for name, make in makers:
        row = {**base, "provider": name, "params": params, "new_tokens": count * n * new}
        try:
            run = make(model, case)
            if run is None:
                rows.append({**row, "status": "skipped: vllm is not importable"})
                continue
            wrong = check(run, model, prompts, n, new, dtype)
            if wrong:
                rows.append({**row, "status": wrong})
                continue
            cpu_times: List[float] = []
            samples = time_provider(run, prompts, n, new, repeats, cpu_times)
        except Exception as exc:  # a crashing provider is reported, not fatal
            rows.append({**row, "status": f"error: {type(exc).__name__}: {exc}"[:200]})
            continue
        p50 = statistics.median(samples)
        rows.append({**row, "status": "ok", "ms_p50": p50, "ms_p20": min(samples), "ms_p80": max(samples),
                     "max_rel_err": 0.0, "peak_extra_bytes": None, "tokens_per_s": row["new_tokens"] / (p50 / 1e3),
                     "cpu_s_p50": statistics.median(cpu_times),
                     "tokens_per_cpu_s": row["new_tokens"] / max(statistics.median(cpu_times), 1e-9)})
    ref = next((r for r in rows if r["provider"] == "transformers generate" and r["status"] == "ok"), None)
    for r in rows:
        if ref is not None and r.get("status") == "ok":
            r["x_generate"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["x_generate_cpu"] = r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"]
    return rows


def summary(rows: Sequence[dict]) -> str:
    lines = ["new tokens/s (x transformers generate), by wall time and by this process's CPU time:"]
    for r in rows:
        if r.get("status") == "ok":
            lines.append(f"  {r['case']:<13} {r['provider']:<22} {r['tokens_per_s']:>10.0f} tok/s  "
                         f"{r.get('x_generate', float('nan')):.2f}x   {r['tokens_per_cpu_s']:>10.0f} tok/cpu-s  "
                         f"{r.get('x_generate_cpu', float('nan')):.2f}x")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bench_arg_parser("bench_rollout", __doc__, CASE_IDS, "tiny model on the CPU, writes nothing")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per provider (default 1 CPU, 3 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args, cases = parse_bench_args(parser, argv, CASE_IDS)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: List[dict] = []
    if args.smoke:
        rows += run_rollout_case("ROLLOUT-SMOKE", SMOKE_CASE, 1)
    else:
        for case_id in cases:
            case = CASES[case_id]
            repeats = args.repeats or (3 if case[0] == "cuda" else 1)
            rows += run_rollout_case(case_id, case, repeats)
    extra = {"threads": torch.get_num_threads(), "cases": {c: [str(x) for x in CASES[c]] for c in cases}}
    return finish("rollout", rows, args, extra=extra, after_table=summary(rows))


if __name__ == "__main__":
    raise SystemExit(main())
