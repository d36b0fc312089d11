"""A tiny model and stage for loop/checkpoint tests (no transformers, no data files)."""
from __future__ import annotations

from typing import List, Sequence

import torch

from fusedrl.data.batch import IGNORE_INDEX, PackedBatch
from fusedrl.stages.base import BaseStage
from fusedrl.kernels import linear_logprobs

VOCAB, HIDDEN = 11, 6


class TinyLM(torch.nn.Module):
    """Embedding -> tanh -> untied head: enough to have real gradients."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def hidden(self, input_ids):
        return torch.tanh(self.proj(self.embed(input_ids)))  # (total, H)


def make_batch(docs: Sequence[Sequence[int]]) -> PackedBatch:
    """Pack documents; every next token is trained."""
    ids, labels, pos, cu = [], [], [], [0]
    for doc in docs:
        ids += list(doc)
        labels += list(doc[1:]) + [IGNORE_INDEX]
        pos += list(range(len(doc)))
        cu.append(cu[-1] + len(doc))
    return PackedBatch(
        input_ids=torch.tensor(ids), labels=torch.tensor(labels), position_ids=torch.tensor(pos),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(len(d) for d in docs),
        num_tokens=sum(len(d) - 1 for d in docs),
    )


def random_docs(generator: torch.Generator, count: int, lo: int = 2, hi: int = 9) -> List[List[int]]:
    lengths = torch.randint(lo, hi, (count,), generator=generator).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


class FakeStage(BaseStage):
    """Each step: `per_step` micro-batches drawn from a seeded stream of documents.

    `nan_steps`: steps whose loss is multiplied by NaN (to test the non-finite path).
    The data position is the state, so resumed runs see the same batches.
    """

    name = "fake"

    def __init__(self, *, per_step: int = 2, docs_per_batch: int = 3, seed: int = 0,
                 nan_steps=(), normalize_by: str = "tokens"):
        self.per_step, self.docs_per_batch, self.seed = per_step, docs_per_batch, seed
        self.nan_steps = set(nan_steps)
        self.normalize_by = normalize_by
        self.position = 0
        self.current_step = 0

    def _batch(self, index: int) -> PackedBatch:
        # Learnable documents: counting up from a random start (next token = token + 1 mod V).
        generator = torch.Generator().manual_seed(self.seed * 100003 + index)
        starts = torch.randint(0, VOCAB, (self.docs_per_batch,), generator=generator).tolist()
        lengths = torch.randint(2, 9, (self.docs_per_batch,), generator=generator).tolist()
        return make_batch([[(a + i) % VOCAB for i in range(n)] for a, n in zip(starts, lengths)])

    def micro_batches(self, model, step):
        self.current_step = step
        batches = [self._batch(self.position + i) for i in range(self.per_step)]
        self.position += self.per_step
        return batches

    def loss(self, model, batch, normalizer):
        logp = linear_logprobs(model.hidden(batch.input_ids), model.head.weight, batch.labels)
        # "tokens": the step's token mean; "sequences": per-sequence sums averaged over sequences.
        loss = -logp.sum() / normalizer
        if self.current_step in self.nan_steps:
            loss = loss * float("nan")
        trained = (batch.labels != IGNORE_INDEX).sum()
        return loss, {"nll": loss.detach(), "trained_tokens": trained}

    def evaluate(self, model):
        batch = self._batch(10**6)
        logp = linear_logprobs(model.hidden(batch.input_ids), model.head.weight, batch.labels)
        return {"loss": float(-logp.sum() / batch.num_tokens)}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]
