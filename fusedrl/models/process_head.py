"""A process reward model: a transformers base model plus a per-token step head (2 or 3 classes, or a scalar).

    prm = ProcessRewardModel.from_causal_lm(policy_like, head="classify", num_classes=3)
    logits = prm.token_logits(batch)     # (total, C) for "classify", (total,) for "scalar", float32
    prm.save_pretrained(folder)          # config.json (+ "fusedrl_prm": {"head", "num_classes"}), model.safetensors
    prm = ProcessRewardModel.from_pretrained(folder)

Only the logits at step-end tokens are trained and read (`fusedrl.kernels.prm`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from fusedrl.data.batch import PackedBatch
from fusedrl.models.packed_attention import packed_forward
from fusedrl.models.scalar_head import base_of_causal_lm

CONFIG_KEY = "fusedrl_prm"
WEIGHTS_NAME = "model.safetensors"
HEADS = ("classify", "scalar")


class ProcessRewardModel(nn.Module):
    """Base model + `score = nn.Linear(H, C)` (classify, C in {2, 3}) or `nn.Linear(H, 1)` (scalar).

    Args:
        model: a transformers base model (config.hidden_size) returning hidden states.
        head: "classify" or "scalar"; num_classes: 2 or 3 (classify only).
        init_std: std of the fresh head's weight (default 1/sqrt(H + 1)).
    """

    def __init__(self, model: nn.Module, *, head: str = "classify", num_classes: int = 2, bias: bool = True,
                 init_std: Optional[float] = None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
        if head == "classify" and num_classes not in (2, 3):
            raise ValueError(f"num_classes: a classify head has 2 or 3 classes, got {num_classes!r}")
        if not hasattr(model, "config") or not hasattr(model.config, "hidden_size"):
            raise TypeError(f"model: expected a transformers base model, got {type(model).__name__}")
        self.model, self.head_kind = model, head
        self.num_classes = num_classes if head == "classify" else 1
        hidden = model.config.hidden_size
        param = next(model.parameters())
        self.score = nn.Linear(hidden, self.num_classes, bias=bias, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            self.score.weight.normal_(0.0, 1.0 / math.sqrt(hidden + 1) if init_std is None else float(init_std))
            if self.score.bias is not None:
                self.score.bias.zero_()

    @property
    def config(self):
        return self.model.config

    @classmethod
    def from_causal_lm(cls, causal_lm: nn.Module, **kwargs) -> "ProcessRewardModel":
        """The base model of `causal_lm` (shared) with a fresh step head; the LM head is dropped."""
        out = cls(base_of_causal_lm(causal_lm), **kwargs)
        out.train(causal_lm.training)
        return out

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None) -> "ProcessRewardModel":
        """Load a folder written by `save_pretrained`."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        spec = getattr(config, CONFIG_KEY, None)
        if not isinstance(spec, dict):
            raise ValueError(f"path: {path} is not a process reward model (no {CONFIG_KEY!r} in its config)")
        base = AutoModel.from_config(config)
        out = cls(base, head=spec["head"], num_classes=spec["num_classes"], bias=spec.get("bias", True))
        missing, unexpected = out.load_state_dict(load_file(str(Path(path) / WEIGHTS_NAME)), strict=False)
        if [k for k in missing if not k.endswith("rotary_emb.inv_freq")] or unexpected:
            raise ValueError(f"path: {path} does not match the model (missing {missing}, unexpected {unexpected})")
        out.to(device=device or "cpu", dtype=dtype)
        return out.eval()

    def token_logits(self, batch: PackedBatch) -> torch.Tensor:
        """(total, C) float32 logits ("classify") or (total,) ("scalar") at every token."""
        if not isinstance(batch, PackedBatch):
            raise TypeError(f"batch: expected a PackedBatch, got {type(batch).__name__}")
        hidden = packed_forward(self.model, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        bias = None if self.score.bias is None else self.score.bias.float()
        out = nn.functional.linear(hidden.float(), self.score.weight.float(), bias)
        return out[:, 0] if self.head_kind == "scalar" else out

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.token_logits(batch)

    def save_pretrained(self, path, tokenizer=None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.model.config.to_dict()
        config[CONFIG_KEY] = {"head": self.head_kind, "num_classes": self.num_classes,
                              "bias": self.score.bias is not None}
        config["architectures"] = [type(self).__name__]
        with open(path / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
        state = {k: v.detach().contiguous().cpu().clone() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
