"""Shared pieces of the alignment-stage tests: a tiny model, the char tokenizer, synthetic preference data."""
from __future__ import annotations

import random

import pytest
import torch

from fusedrl.config import load_config
from fusedrl.models.causal_lm import build_model
from fusedrl.stages.configs_alignment import AlignmentTrainConfig
from fusedrl.data.tokenizer import build_char_tokenizer

TOKENIZER = build_char_tokenizer("abcdefghxyz: ")
TINY = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(TOKENIZER),
        "max_position_embeddings": 64, "eos_token_id": TOKENIZER.eos_token_id,
        "pad_token_id": TOKENIZER.pad_token_id, "bos_token_id": TOKENIZER.bos_token_id}


def tiny_lm(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config=dict(TINY), device="cpu")


def preference_records(n: int, seed: int = 0):
    """Chosen completions use letters a-c, rejected ones x-z: a reward any tiny model can learn."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = "p: " + "".join(rng.choice("defgh") for _ in range(rng.randint(1, 3)))
        chosen = "".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
        rejected = "".join(rng.choice("xyz") for _ in range(rng.randint(1, 4)))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def config(**sections):
    """An AlignmentTrainConfig with quiet logging and the given {section: {field: value}} overrides."""
    pairs = [("logging.progress", "false"), ("logging.plots", "false"), ("checkpoint.save_final", "false"),
             ("run.device", "cpu")]
    for section, values in sections.items():
        for key, value in values.items():
            pairs.append((f"{section}.{key}", value if isinstance(value, str) else repr(value).replace("'", '"')))
    return load_config(None, pairs, cls=AlignmentTrainConfig)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread (more threads spin when the cores are shared)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
