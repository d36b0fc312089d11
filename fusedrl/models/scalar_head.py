"""A causal-LM backbone with a scalar head: reward models and PPO value models.

    rm = ScalarHeadModel.from_causal_lm(build_model(config={...}))   # fresh head on a built LM
    rm = ScalarHeadModel.from_pretrained("runs/sft/final")            # a causal LM: fresh head
    rm = ScalarHeadModel.from_pretrained("runs/rm/final")             # a saved scalar-head model
    r = rm.scores(batch)           # (num_seqs,) float32, read at each packed sequence's last token
    v = rm.token_values(batch)     # (total,)   float32, one value per token (PPO critic)
    rm.save_pretrained("runs/rm/final")

Layout. The module holds the backbone's base model as ``model`` and the head as
``score`` (``nn.Linear(H, 1)``), so its ``state_dict`` keys are those of
transformers' ``XForSequenceClassification`` (``model.*`` and ``score.weight``):
``save_pretrained`` writes ``config.json`` (architectures set to that class,
``num_labels = 1``) and ``model.safetensors``, which loads back here and, where
transformers has the class (Llama, Qwen2, Qwen3, Mistral, Gemma, Phi3, ...),
with ``AutoModelForSequenceClassification.from_pretrained``. The causal LM's
output head is dropped: a scorer never needs the (V, H) projection.

Scores are read at the last token of each document of a packed batch
(``cu_seqlens[1:] - 1``): packed batches carry no padding, so this is the last
non-pad token. Head math runs in float32 whatever the backbone dtype.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from fusedrl.data.batch import PackedBatch
from fusedrl.models.causal_lm import enable_activation_checkpointing, resolve_dtype
from fusedrl.models.packed_attention import packed_forward

CONFIG_KEY = "fusedrl_scalar_head"  # written into config.json: {"bias": bool}
WEIGHTS_NAME = "model.safetensors"


def last_token_index(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(num_seqs,) int64 flat index of each packed document's last token."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor of >= 2 boundaries, got shape {tuple(cu_seqlens.shape)}")
    return cu_seqlens[1:].to(torch.int64) - 1


def _sequence_classification_class(config) -> Optional[str]:
    """Name of transformers' ``XForSequenceClassification`` for this config, or None."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        for suffix in ("ForCausalLM", "ForSequenceClassification", "Model"):
            if arch.endswith(suffix):
                name = arch[: -len(suffix)] + "ForSequenceClassification"
                if hasattr(transformers, name):
                    return name
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(getattr(config, "model_type", None))
    return name if name and hasattr(transformers, name) else None



def base_of_causal_lm(causal_lm: nn.Module) -> nn.Module:
    """The decoder of a transformers *ForCausalLM (shared, not copied), for a model with its own head."""
    base = getattr(causal_lm, "base_model", None)
    if base is None or base is causal_lm:
        raise TypeError(f"causal_lm: expected a transformers *ForCausalLM model, got {type(causal_lm).__name__}")
    return base

class ScalarHeadModel(nn.Module):
    """A transformers base model plus a linear scalar head.

    Args:
        model: the base model (``AutoModel``, e.g. ``Qwen2Model``) returning hidden states.
        score: the head, ``nn.Linear(hidden_size, 1)``; None builds one with
            weight ~ N(0, 1/(H + 1)) and zero bias, in the base model's dtype and device.
        bias: whether a fresh head has a bias (ignored when ``score`` is given).
        init_std: std of a fresh head's weight (default 1/sqrt(H + 1)); 0 gives a zero head.
    """

    def __init__(self, model: nn.Module, score: Optional[nn.Linear] = None, *, bias: bool = False,
                 init_std: Optional[float] = None):
        super().__init__()
        if not hasattr(model, "config") or not hasattr(model.config, "hidden_size"):
            raise TypeError(f"model: expected a transformers base model with config.hidden_size, "
                            f"got {type(model).__name__}")
        self.model = model
        hidden = model.config.hidden_size
        if score is None:
            param = next(model.parameters())
            score = nn.Linear(hidden, 1, bias=bias, device=param.device, dtype=param.dtype)
            std = 1.0 / math.sqrt(hidden + 1) if init_std is None else float(init_std)
            with torch.no_grad():
                score.weight.normal_(0.0, std) if std > 0 else score.weight.zero_()
                if score.bias is not None:
                    score.bias.zero_()
        if not isinstance(score, nn.Linear) or score.in_features != hidden or score.out_features != 1:
            raise ValueError(f"score: expected nn.Linear({hidden}, 1), got {score!r}")
        self.score = score

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_causal_lm(cls, causal_lm: nn.Module, **kwargs) -> "ScalarHeadModel":
        """Take the base model of ``causal_lm`` (shared, not copied) and add a fresh head; the LM head is dropped."""
        model = cls(base_of_causal_lm(causal_lm), **kwargs)
        model.train(causal_lm.training)
        return model

    @classmethod
    def from_pretrained(cls, name_or_path, *, dtype=None, device=None, bias: bool = False,
                        init_std: Optional[float] = None, attn_implementation: str = "sdpa",
                        gradient_checkpointing: bool = False, trust_remote_code: bool = False) -> "ScalarHeadModel":
        """Load a saved scalar-head model, or a causal LM (a fresh head is then added).

        Args:
            name_or_path: a ``save_pretrained`` folder (ours, transformers'
                ``XForSequenceClassification`` with one label, or a causal LM) or a hub id.
            dtype, device: as in ``fusedrl.models.causal_lm.build_model``.
            bias, init_std: for a fresh head only.
            attn_implementation: attention for unpacked calls.
            gradient_checkpointing: recompute each layer's activations in backward.
            trust_remote_code: let transformers run the folder's own Python code (never asked on stdin).

        Returns:
            The model, in train mode.
        """
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"name_or_path: expected a str path or hub id, got {type(name_or_path).__name__}")
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(dtype, device)
        remote = {"trust_remote_code": bool(trust_remote_code)}
        if not trust_remote_code:
            from fusedrl.models.causal_lm import refuse_remote_code
            refuse_remote_code(name_or_path, "name_or_path")
        config = AutoConfig.from_pretrained(name_or_path, **remote)
        archs = getattr(config, "architectures", None) or []
        head_saved = getattr(config, CONFIG_KEY, None) is not None or any(
            a.endswith("ForSequenceClassification") for a in archs)
        if head_saved and getattr(config, "num_labels", 1) != 1:
            raise ValueError(f"name_or_path: {name_or_path} is a classifier with {config.num_labels} labels; "
                             f"a scalar head needs 1")
        if head_saved and not (Path(name_or_path) / WEIGHTS_NAME).is_file() and _sequence_classification_class(config):
            # A hub (or sharded) sequence-classification checkpoint: let transformers resolve it.
            full = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, dtype=dtype, attn_implementation=attn_implementation, num_labels=1, **remote)
            model = cls(full.base_model, full.score)
        else:
            base = AutoModel.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation,
                                             **remote)
            score = _load_saved_head(name_or_path, config, dtype) if head_saved else None
            model = cls(base, score, bias=bias, init_std=init_std)
        model.to(device)
        if gradient_checkpointing:
            enable_activation_checkpointing(model.model)
        model.model.config.use_cache = False
        model.train()
        return model

    # ------------------------------------------------------------------ forward

    @property
    def config(self):
        """The base model's config (what the loop and generation read)."""
        return self.model.config

    def hidden(self, batch: PackedBatch) -> torch.Tensor:
        """(total, H) final hidden states of the packed batch (model dtype)."""
        if not isinstance(batch, PackedBatch):
            raise TypeError(f"batch: expected a PackedBatch, got {type(batch).__name__}")
        device = self.score.weight.device
        if batch.input_ids.device != device:
            raise ValueError(f"batch: is on {batch.input_ids.device} but the model is on {device}; "
                             f"call batch.to({str(device)!r}) first")
        return packed_forward(self.model, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scalar head on (..., H) hidden states -> (...) float32."""
        bias = None if self.score.bias is None else self.score.bias.float()
        return nn.functional.linear(hidden.float(), self.score.weight.float(), bias).squeeze(-1)

    def token_values(self, batch: PackedBatch) -> torch.Tensor:
        """(total,) float32 per-token values: the head applied to every token's hidden state."""
        return self.head(self.hidden(batch))

    def scores(self, batch: PackedBatch) -> torch.Tensor:
        """(num_seqs,) float32 scores at the last token of each packed sequence."""
        hidden = self.hidden(batch)  # (total, H)
        return self.head(hidden.index_select(0, last_token_index(batch.cu_seqlens)))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Same as ``scores``."""
        return self.scores(batch)

    # ------------------------------------------------------------------ save

    def save_pretrained(self, path, tokenizer=None) -> None:
        """Write ``config.json``, ``model.safetensors`` (keys ``model.*``, ``score.*``) and the tokenizer if given."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.model.config.to_dict()
        name = _sequence_classification_class(self.model.config)
        has_bias = self.score.bias is not None
        # transformers' classifiers have a bias-free head: only then is the file theirs too.
        config["architectures"] = [name] if name and not has_bias else [type(self).__name__]
        config["num_labels"] = 1
        config.pop("id2label", None)
        config.pop("label2id", None)
        config[CONFIG_KEY] = {"bias": has_bias}
        with open(path / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(_dedupe_shared(state), str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))


def _dedupe_shared(state: dict) -> dict:
    """safetensors refuses tensors sharing storage; keep the first name of each (the base model ties none we keep)."""
    seen, out = set(), {}
    for key, value in state.items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        out[key] = value.clone() if value.untyped_storage().nbytes() != value.numel() * value.element_size() else value
    return out


def _load_saved_head(name_or_path, config, dtype) -> nn.Linear:
    """The ``score`` head from a local folder's safetensors files."""
    from safetensors import safe_open

    folder = Path(name_or_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in ("score.weight", "score.bias"):
                if key in f.keys():
                    tensors[key] = f.get_tensor(key)
    if "score.weight" not in tensors:
        raise ValueError(f"name_or_path: {name_or_path} says it holds a scalar head but no 'score.weight' "
                         f"was found in its safetensors files {[f.name for f in files]}")
    weight = tensors["score.weight"]
    if tuple(weight.shape) != (1, config.hidden_size):
        raise ValueError(f"name_or_path: score.weight has shape {tuple(weight.shape)}, "
                         f"expected (1, {config.hidden_size})")
    score = nn.Linear(config.hidden_size, 1, bias="score.bias" in tensors, dtype=dtype)
    with torch.no_grad():
        score.weight.copy_(weight)
        if "score.bias" in tensors:
            score.bias.copy_(tensors["score.bias"].reshape(1))
    return score
