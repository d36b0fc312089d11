"""A frozen teacher for distillation: loading, CPU offload, and hidden states aligned with the student's tokens.

The distillation divergence (`fusedrl.kernels.linear_distill_loss`) reads both models'
final hidden states and LM heads, never their logits. The teacher may see a different
prefix than the student (SDPO shows it a correct sibling completion first), so its
hidden states are computed on (teacher prompt + the student's completion) and moved to
the student's layout: the row of the student position that predicts completion token j
gets the teacher row that predicts the same token. Prompt rows are zero (not trained).

    teacher = load_teacher("teacher-folder", device=device, vocab_size=V, offload=True)
    with teacher.on_device():
        h_t = aligned_hidden(teacher.model, batch, teacher_prompts, prompt_lens, device)  # (total, H_T)
    loss, metrics = linear_distill_loss(h_s, W_s, h_t, *teacher.head(device), labels=batch.labels, ...)

The teacher is never a trainable and never part of a stage's state_dict: it is built from
the config when the stage is built.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional, Sequence, Tuple

import torch

from fusedrl.data.batch import IGNORE_INDEX, PackedBatch
from fusedrl.data.packed import Example, build_batch
from fusedrl.models.causal_lm import hidden_states, lm_head


class Teacher:
    """A frozen causal LM (eval mode, no gradients), optionally kept on the CPU between uses.

    Args:
        model: the teacher (any transformers causal LM with the student's vocabulary).
        device: where its forwards run.
        offload: keep it on the CPU except inside `on_device()`.
    """

    def __init__(self, model: torch.nn.Module, *, device, offload: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.device, self.offload = torch.device(device), bool(offload)
        self._head: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self.model.to("cpu" if self.offload else self.device)

    @contextmanager
    def on_device(self):
        """Move the teacher to its device for the block (a no-op without offload)."""
        if self.offload:
            self.model.to(self.device)
        try:
            yield self.model
        finally:
            if self.offload:
                self.model.to("cpu")

    def prepare_sharding(self) -> torch.nn.Module:
        """Before FSDP2 shards the teacher (`fusedrl train` under torchrun): its body on the device, no CPU
        offload of its own (FSDP2's `parallel.cpu_offload` is the sharded equivalent). Returns the model."""
        if self.offload:
            self.model.to(self.device)
            self.offload = False
        self._head = None
        return self.model

    def head(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight (V, H_T), bias or None) on the device, detached; kept there when the body is offloaded.

        On an FSDP2-sharded teacher the loss reads the head outside the teacher's forward (inside the
        student's), so the full head is gathered once (an all-gather on every rank, at the same call:
        the first micro-batch's loss, or the first rollout while the teacher is gathered) and kept: the
        teacher is frozen. Its decoder layers and embeddings stay sharded.
        """
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.model, FSDPModule):
            if self._head is None:
                weight, bias = lm_head(self.model)
                self._head = (_full(weight, self.device), None if bias is None else _full(bias, self.device))
            return self._head
        if self._head is None or self._head[0].device != self.device:
            weight, bias = lm_head(self.model)
            self._head = (weight.detach().to(self.device), None if bias is None else bias.detach().to(self.device))
        if not self.offload:  # follow the live parameters
            weight, bias = lm_head(self.model)
            return weight.detach(), None if bias is None else bias.detach()
        return self._head


def _full(tensor: torch.Tensor, device) -> torch.Tensor:
    """A parameter of a sharded model as a full, detached tensor of its own (a DTensor shard is all-gathered;
    a gathered parameter is copied, its storage is freed when the model is resharded)."""
    from torch.distributed.tensor import DTensor

    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.clone()
    return full.detach().to(device)


def load_teacher(name_or_path: str, *, device, vocab_size: int, dtype: Optional[str] = None,
                 offload: bool = False) -> Teacher:
    """Load a teacher from a folder or hub id; ValueError when its vocabulary differs from the student's."""
    from fusedrl.models.causal_lm import build_model

    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"teacher: expected a model folder or hub id, got {name_or_path!r}")
    model = build_model(name_or_path=name_or_path, dtype=None if dtype in (None, "auto") else dtype,
                        device=torch.device("cpu") if offload else torch.device(device))
    return checked_teacher(model, device=device, vocab_size=vocab_size, offload=offload)


def checked_teacher(model, *, device, vocab_size: int, offload: bool = False) -> Teacher:
    """Wrap an already built model as a Teacher after checking its LM head's vocabulary size."""
    weight, _ = lm_head(model)
    if weight.shape[0] != vocab_size:
        raise ValueError(f"teacher: its vocabulary has {weight.shape[0]} tokens, the student's {vocab_size}; "
                         f"distillation needs the same vocabulary")
    return Teacher(model, device=device, offload=offload)


def aligned_hidden(model, batch: PackedBatch, teacher_prompts: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                   device) -> torch.Tensor:
    """Teacher hidden states in the student batch's layout; (batch.total, H_T) on `device`, no grad.

    Args:
        model: the teacher (or, for self-distillation, the student itself).
        batch: the student's packed batch (host or device); sequence k is prompt + completion.
        teacher_prompts: per sequence of the batch, the teacher's prompt token ids (>= 1 token).
        prompt_lens: per sequence, the student's prompt length (>= 1).
    """
    bounds = batch.cu_seqlens.tolist()
    if len(teacher_prompts) != batch.num_seqs or len(prompt_lens) != batch.num_seqs:
        raise ValueError(f"teacher_prompts / prompt_lens: expected {batch.num_seqs} entries (one per sequence), "
                         f"got {len(teacher_prompts)} / {len(prompt_lens)}")
    ids = batch.input_ids.tolist()
    examples: List[Example] = []
    src, dst, offset = [], [], 0
    for k in range(batch.num_seqs):
        start, end, p = bounds[k], bounds[k + 1], int(prompt_lens[k])
        tp = [int(t) for t in teacher_prompts[k]]
        if p < 1 or not tp:
            raise ValueError(f"prompt_lens / teacher_prompts: sequence {k} needs a non-empty prompt on both sides")
        completion = ids[start + p:end]
        examples.append(Example(tp + completion, [IGNORE_INDEX] * len(tp) + completion))
        c = len(completion)
        dst.append(torch.arange(start + p - 1, start + p - 1 + c))
        src.append(torch.arange(offset + len(tp) - 1, offset + len(tp) - 1 + c))
        offset += len(tp) + c
    teacher_batch = build_batch(examples, list(range(len(examples)))).to(device)
    with torch.no_grad():
        hidden = hidden_states(model, teacher_batch)
        out = hidden.new_zeros(batch.total, hidden.shape[-1])
        out[torch.cat(dst).to(device)] = hidden[torch.cat(src).to(device)]
    return out


def distill_token_kl(exp, student, teacher: Teacher, *, token_budget: int, device, temperature: float = 1.0
                     ) -> List[torch.Tensor]:
    """Exact reverse KL(student || teacher) of each completion token of an Experience, token-aligned like
    exp.tok (entry j: the KL of the distributions that emit token j; 0 on prompt tokens), on the host.

    The dense reward of on-policy distillation is its negative. The teacher reads the same tokens.
    """
    from fusedrl.kernels import linear_distill_loss
    from fusedrl.rollout.experience import token_forward

    def per_position(batch: PackedBatch) -> torch.Tensor:
        weight, bias = lm_head(student)
        t_weight, t_bias = teacher.head()
        _, _, kl = linear_distill_loss(
            hidden_states(student, batch), weight, hidden_states(teacher.model, batch), t_weight, student_bias=bias,
            teacher_bias=t_bias, labels=batch.labels, cu_seqlens=batch.cu_seqlens, kind="reverse_kl",
            temperature=temperature, return_per_token=True)
        return kl

    with torch.no_grad(), teacher.on_device():
        return token_forward(exp, per_position, token_budget, device)


def reward_teacher(table, model_cfg, policy) -> Optional[Teacher]:
    """The frozen teacher of a [pg] / [ppo] table's distillation reward (None when distill_coef is 0)."""
    if not table.distill_coef:
        return None
    device = next(policy.parameters()).device
    return load_teacher(table.distill_teacher, device=device, vocab_size=lm_head(policy)[0].shape[0],
                        dtype=model_cfg.dtype)
