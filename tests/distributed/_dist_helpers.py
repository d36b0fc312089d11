"""Shared pieces of the distributed tests: a tiny Qwen2, a deterministic global batch, packing,
the SFT and GRPO losses on packed batches, and a world-size-2 launcher (torch.multiprocessing)."""
from __future__ import annotations

import os
import socket
from typing import List, Sequence

import torch
import torch.distributed as dist

from fusedrl.models.packed_attention import packed_forward
from fusedrl.kernels import dpo_loss, grpo_advantages, linear_logprobs, policy_loss
from fusedrl.packing import pack_by_budget
from fusedrl.train.dp_balance import agree_micro_batches, global_counts, loss_divisor, split_for_ranks
from fusedrl.train.parallel import run_forward

VOCAB, IGNORE = 97, -100
# Per-rank token budgets chosen so that ranks get different micro-batch counts (sft step 2, grpo, dpo).
BUDGET = {"sft": 24, "grpo": 40, "dpo": 60}


def tiny_model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).float()


def global_batch(step: int, n: int = 7, group_size: int = 1):
    """The step's sequences (identical on every rank): token lists, prompt lengths, group ids, rewards."""
    gen = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(5, 24, (n,), generator=gen).tolist()
    seqs = [torch.randint(0, VOCAB, (L,), generator=gen) for L in lengths]
    prompts = [int(torch.randint(1, L - 2, (1,), generator=gen)) for L in lengths]
    groups = [i // group_size for i in range(n)]
    rewards = torch.rand(n, generator=gen)
    return seqs, prompts, groups, rewards


def pack(seqs: Sequence[torch.Tensor], prompts: Sequence[int]):
    """One packed micro-batch: ids, labels (prompt and last token ignored), positions, cu_seqlens."""
    ids = torch.cat(list(seqs))
    labels, positions = [], []
    for seq, prompt in zip(seqs, prompts):
        lab = torch.full_like(seq, IGNORE)
        lab[prompt - 1:-1] = seq[prompt:]  # predict the completion tokens
        labels.append(lab)
        positions.append(torch.arange(seq.numel()))
    lens = torch.tensor([s.numel() for s in seqs])
    cu = torch.nn.functional.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)
    return {"input_ids": ids, "labels": torch.cat(labels), "position_ids": torch.cat(positions),
            "cu_seqlens": cu, "max_seqlen": int(lens.max())}


def _token_logprobs(model, batch):
    hidden = packed_forward(model, batch["input_ids"], batch["position_ids"], batch["cu_seqlens"],
                            batch["max_seqlen"])  # (total, H)
    return linear_logprobs(hidden, model.lm_head.weight, batch["labels"])  # (total,)


def sft_loss_sum(model, batch):
    logp = _token_logprobs(model, batch)
    return -(logp * (batch["labels"] != IGNORE)).sum()


def grpo_loss(model, batch, advantages, divisor, ref_logp):
    logp = _token_logprobs(model, batch)
    mask = batch["labels"] != IGNORE
    loss, _ = policy_loss(logp, None, advantages, mask, cu_seqlens=batch["cu_seqlens"], algo="grpo",
                          ref_logp=ref_logp, beta=0.04, num_tokens=divisor)
    return loss


def frozen_reference():
    """The KL reference: the initial weights, no grads (sharded like the policy in the FSDP runs)."""
    return tiny_model().requires_grad_(False).eval()


def step_batch(step: int, algo: str):
    group_size = 1 if algo == "sft" else 2  # grpo: 2 samples per prompt; dpo: (chosen, rejected) pairs
    return global_batch(step, n=7 if algo == "sft" else 8, group_size=group_size) + (group_size,)


def _micro_batches(mine: List[int], lengths: List[int], groups: List[int], algo: str) -> List[List[int]]:
    """Pack this rank's sequences under the token budget; DPO packs whole pairs (its loss pairs them)."""
    units = [[i] for i in mine]
    if algo == "dpo":
        units = [[i for i in mine if groups[i] == g] for g in dict.fromkeys(groups[i] for i in mine)]
    bins = pack_by_budget([sum(lengths[i] for i in unit) for unit in units], BUDGET[algo])
    return [[i for u in part for i in units[u]] for part in bins]


def micro_batch_counts(step: int, algo: str, world: int) -> List[int]:
    """Micro-batches each rank packs its share into (before agree_micro_batches)."""
    seqs, _, groups, _, _ = step_batch(step, algo)
    lengths = [s.numel() for s in seqs]
    parts = split_for_ranks(lengths, world, group_ids=groups)
    return [len(_micro_batches(part, lengths, groups, algo)) for part in parts]


def _sequence_sums(per_token: torch.Tensor, batch) -> torch.Tensor:
    """(num_seqs,) sums of a (total,) per-token tensor over each packed document."""
    lens = batch["cu_seqlens"].diff().long()
    seq_of_token = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    return per_token.new_zeros(lens.numel()).index_add(0, seq_of_token, per_token)


def _completion_logp(model, batch) -> torch.Tensor:
    return _sequence_sums(_token_logprobs(model, batch) * (batch["labels"] != IGNORE), batch)  # (num_seqs,)


def dpo_step_loss(model, batch, ref_seq_logp, divisor):
    seq_logp = _completion_logp(model, batch)  # (2P,): chosen, rejected, chosen, ...
    loss, _ = dpo_loss(seq_logp[0::2], seq_logp[1::2], ref_seq_logp[0::2], ref_seq_logp[1::2], beta=0.1,
                       num_pairs=divisor)
    return loss


def _micro_loss(model, ref, batch, algo, advantages, divisor):
    if algo == "grpo":
        with torch.no_grad():
            ref_logp = run_forward(ref, _token_logprobs, batch)  # (total,) from the frozen reference
        return run_forward(model, grpo_loss, batch, advantages, divisor, ref_logp)
    if algo == "dpo":
        with torch.no_grad():
            ref_seq_logp = run_forward(ref, _completion_logp, batch)
        return run_forward(model, dpo_step_loss, batch, ref_seq_logp, divisor)
    return run_forward(model, sft_loss_sum, batch) / divisor


def train_step(model, optimizer, step: int, *, algo: str, rank: int, world: int, ref=None, device=None) -> dict:
    """One global-batch step on this rank's balanced share; returns the global loss and grad norm.

    GRPO (KL penalty beta = 0.04) and DPO steps need `ref`, the frozen reference model.
    `device`: where the batches go (default: the parameters' device; with CPU offload, the GPU).
    """
    seqs, prompts, groups, rewards, group_size = step_batch(step, algo)
    lengths = [s.numel() for s in seqs]
    mine = split_for_ranks(lengths, world, group_ids=groups)[rank] if world > 1 else list(range(len(seqs)))
    # Each rank normalises only its own groups' rewards: right because whole groups stay on one rank.
    advantages = torch.zeros(len(seqs))
    if algo == "grpo":
        advantages[mine] = grpo_advantages(rewards[mine], group_size)
    micro = _micro_batches(mine, lengths, groups, algo)
    device = device if device is not None else next(model.parameters()).device
    tokens, num_seqs = global_counts(sum(lengths[i] - prompts[i] for i in mine), len(mine), device)
    divisor = loss_divisor(num_seqs // 2 if algo == "dpo" else tokens, world)  # pairs or trained tokens
    total = agree_micro_batches(len(micro), device)
    loss_sum = torch.zeros((), device=device)
    for k in range(total):
        idx = micro[min(k, len(micro) - 1)]
        batch = pack([seqs[i] for i in idx], [prompts[i] for i in idx])
        batch = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in batch.items()}
        loss = _micro_loss(model, ref, batch, algo, advantages[idx].to(device), divisor)
        if k >= len(micro):
            loss = loss * 0.0  # a padding micro-batch: the collectives run, the gradient is zero
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)  # sum_r loss_r * W/N / W = total / N
    return {"loss": float(loss_sum), "grad_norm": float(grad_norm)}


def full_weights(model) -> dict:
    """Every parameter as a full CPU tensor (a collective on a sharded model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def spawn(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, free_port()) + tuple(args), nprocs=world, join=True)


def optimizer_for(model):
    # AdamW's update lr * g / (|g| + eps) has slope lr / eps at g ~ 0: with the default eps (1e-8) a
    # near-zero gradient's float32 summation-order noise (~1e-10) moves a weight by ~1e-5 and any
    # two reduction orders disagree beyond 1e-6. eps = 1e-4 bounds that gain to 10.
    return torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.01)
