"""A whole GRPO training step (forward, backward, AdamW): fusedrl packed vs a transformers padded step.

Case STEP-0.5B: the Qwen2.5-0.5B architecture (hidden 896, 24 layers, 14 heads / 2 KV heads,
intermediate 4864, vocabulary 151936, tied embeddings), built from its config with random
weights (no download), bf16; 64 sequences of 128..1024 tokens (uniform, seeded), a prompt of
a quarter of each, one advantage per sequence, on-policy clipped surrogate, token mean.

Providers (the same sequences, the same per-micro-batch token cap of 16384):
- fusedrl packed: `packed_forward` (varlen attention, no padding) then `linear_policy_loss`
  (the LM head inside the log-prob kernel: no logits), micro-batches packed best-fit;
- transformers padded: `model(input_ids, attention_mask)` on right-padded rows (as many rows
  of the longest length as fit the cap), bf16 logits, float32 log-softmax, the same loss.
Both step AdamW once. Reported: ms per step, tokens/s (real tokens, padding excluded), peak
memory (CUDA allocator, above the model and optimizer). The loss of both must agree (rel err).

    python -m fusedrl.bench.bench_step              # on a GPU: writes bench/results/step-*.json
    python -m fusedrl.bench.bench_step --smoke      # a tiny Qwen2 on CPU, float32, writes nothing

Goal (issue 16): packed >= 2.5x the padded tokens/s at <= 0.5x its peak memory.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import torch

from fusedrl.bench.common import bench_arg_parser, bench_device, finish, parse_bench_args, peak_extra_bytes, time_ms

CASE_IDS = ("STEP-0.5B",)
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=101, max_position_embeddings=128, tie_word_embeddings=True)
EPS = 0.2


def _model(arch: dict, dtype: torch.dtype, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**arch, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def _sequences(n: int, lo: int, hi: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    seqs = [torch.randint(0, vocab, (length,), generator=gen) for length in lengths]
    adv = torch.randn(n, generator=gen)
    return seqs, [max(1, length // 4) for length in lengths], adv


def _packed_batches(seqs, prompts, adv, budget: int, device: str):
    from fusedrl.packing import cu_seqlens_and_positions, pack_by_budget

    out = []
    for members in pack_by_budget([len(s) for s in seqs], budget):
        ids = torch.cat([seqs[i] for i in members])
        labels, advs = [], []
        for i in members:
            lab = torch.full_like(seqs[i], -100)
            lab[prompts[i] - 1:-1] = seqs[i][prompts[i]:]
            labels.append(lab)
            advs.append(torch.full((len(seqs[i]),), float(adv[i])))
        cu, pos = cu_seqlens_and_positions([len(seqs[i]) for i in members])
        out.append({k: v.to(device) for k, v in dict(ids=ids, labels=torch.cat(labels), pos=pos, cu=cu,
                                                     adv=torch.cat(advs)).items()} | {"max": max(len(seqs[i]) for i in members)})
    return out


def _padded_batches(seqs, prompts, adv, budget: int, device: str):
    longest = max(len(s) for s in seqs)
    rows = max(1, budget // longest)
    out = []
    for start in range(0, len(seqs), rows):
        chunk = range(start, min(start + rows, len(seqs)))
        ids = torch.zeros(len(chunk), longest, dtype=torch.int64)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        advs = torch.zeros(len(chunk))
        for r, i in enumerate(chunk):
            n = len(seqs[i])
            ids[r, :n], mask[r, :n] = seqs[i], 1
            labels[r, prompts[i] - 1:n - 1] = seqs[i][prompts[i]:]
            advs[r] = adv[i]
        out.append({k: v.to(device) for k, v in dict(ids=ids, mask=mask, labels=labels, adv=advs).items()})
    return out


def _surrogate(logp: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    ratio = torch.exp(logp - logp.detach())
    return -torch.min(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)


def _packed_step(model, optimizer, batches, total_tokens: int) -> torch.Tensor:
    from fusedrl.kernels import linear_policy_loss
    from fusedrl.models.packed_attention import packed_forward

    loss_sum = 0.0
    for b in batches:
        hidden = packed_forward(model, b["ids"], b["pos"], b["cu"], b["max"])
        loss, _ = linear_policy_loss(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, b["labels"], None,
                                     b["adv"], cu_seqlens=b["cu"], algo="grpo", eps_low=EPS, eps_high=EPS,
                                     aggregation="token_mean", num_tokens=total_tokens)
        loss.backward()
        loss_sum = loss_sum + loss.detach().float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def _padded_step(model, optimizer, batches, total_tokens: int) -> torch.Tensor:
    loss_sum = 0.0
    for b in batches:
        logits = model(input_ids=b["ids"], attention_mask=b["mask"]).logits  # (rows, L, V), model dtype
        trained = b["labels"] != -100
        logp = torch.log_softmax(logits.float(), -1).gather(-1, b["labels"].clamp(min=0)[..., None]).squeeze(-1)
        per_token = _surrogate(logp, b["adv"][:, None])
        loss = (per_token * trained).sum() / total_tokens
        loss.backward()
        loss_sum = loss_sum + loss.detach().float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def run(smoke: bool, device: str) -> List[dict]:
    arch, dtype = (TINY, torch.float32) if smoke else (QWEN25_05B, torch.bfloat16)
    n, lo, hi, budget = (12, 8, 40, 96) if smoke else (64, 128, 1024, 16384)
    seqs, prompts, adv = _sequences(n, lo, hi, arch["vocab_size"])
    trained = sum(len(s) - p for s, p in zip(seqs, prompts))
    real_tokens = sum(len(s) for s in seqs)
    rows, losses = [], {}
    for name, step, make in (("fusedrl packed", _packed_step, _packed_batches),
                             ("transformers padded", _padded_step, _padded_batches)):
        model = _model(arch, dtype, device)  # the same seed: the same weights for both
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every timed step sees the same weights
        batches = make(seqs, prompts, adv, budget, device)
        losses[name] = float(step(model, optimizer, batches, trained))  # also creates the optimizer state
        p50, p20, p80 = time_ms(lambda: step(model, optimizer, batches, trained), warmup_ms=0, rep_ms=1)
        peak = peak_extra_bytes(lambda: step(model, optimizer, batches, trained))
        rows.append({"case": CASE_IDS[0], "provider": name, "mode": "step", "ms_p50": p50, "ms_p20": p20,
                     "ms_p80": p80, "peak_extra_bytes": peak, "tokens_per_s": real_tokens / (p50 / 1e3),
                     "micro_batches": len(batches), "loss": losses[name], "status": "ok"})
        del model, optimizer, batches
        if device == "cuda":
            torch.cuda.empty_cache()
    reference = losses["transformers padded"]
    for row in rows:
        row["max_rel_err"] = abs(row["loss"] - reference) / max(abs(reference), 1e-12)
        if row["max_rel_err"] > (1e-4 if smoke else 2e-2):
            row["status"] = f"loss differs from the padded step by {row['max_rel_err']:.1e}"
    return rows


def summary(rows: Sequence[dict]) -> str:
    by = {r["provider"]: r for r in rows}
    packed, padded = by["fusedrl packed"], by["transformers padded"]
    speed = packed["tokens_per_s"] / padded["tokens_per_s"]
    memory = (packed["peak_extra_bytes"] / padded["peak_extra_bytes"]
              if packed.get("peak_extra_bytes") and padded.get("peak_extra_bytes") else float("nan"))
    return (f"STEP-0.5B: packed {packed['tokens_per_s']:.0f} tokens/s vs padded {padded['tokens_per_s']:.0f} "
            f"({speed:.2f}x, goal >= 2.5x); peak memory {memory:.2f}x of padded (goal <= 0.5x)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bench_arg_parser("bench_step", __doc__, CASE_IDS)
    args, cases = parse_bench_args(parser, argv, CASE_IDS)
    device = bench_device("bench_step", args.smoke, args.device)
    if device is None or not cases:
        return 0
    rows = run(args.smoke, device)
    return finish("step", rows, args, after_table=summary(rows))


if __name__ == "__main__":
    sys.exit(main())
