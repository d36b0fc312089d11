"""LoRA adapters on the policy through PEFT: train the adapters only, take the reference from the same weights.

    model = apply_lora(model, {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]})  # a PeftModel
    inner = unwrap(model)             # the transformers model, LoRA layers in place (packed_forward runs it)
    ref = AdapterDisabled(model)      # the reference: the policy with its adapters off (no second model)
    critic = base_copy(model)         # PPO's value model: a full copy of the base weights, no adapters
    save_adapter(model, path)         # adapter_model.safetensors + adapter_config.json (checkpoints)
    load_adapter(model, path)
    save_merged(model, path)          # W + scale * B A in the save_pretrained layout (final/)

The base weights are frozen (requires_grad False), so the loop's optimizer (it takes the
parameters that require a gradient, `fusedrl.train.optim`) sees the adapters only. The fused
LM-head kernels read the head's plain weight, so the head and the embeddings may not be LoRA
targets (`check_head` refuses them; config validation refuses them by name first). PEFT is the
optional extra ``fusedrl[lora]``; without it, a config with `[model] lora` is a one-line error.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

import torch

from fusedrl.config import ConfigError, check_lora_table

INSTALL_HINT = "pip install 'fusedrl[lora]' (the `peft` package)"
ADAPTER_FILE = "adapter_model.safetensors"


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError.message("model.lora", f"model.lora: LoRA needs the optional extra: {INSTALL_HINT}") from None
    return peft


def is_peft_model(model: Any) -> bool:
    """True for a PEFT-wrapped model (peft is not imported for the check)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def apply_lora(model: torch.nn.Module, table: Dict[str, Any]) -> torch.nn.Module:
    """Wrap a transformers causal LM with LoRA adapters as `table` ([model] lora) says.

    Keys: r (rank, required), alpha (default r: scale alpha / r = 1), dropout (default 0.0),
    target_modules (default: PEFT's choice for the model family, its attention projections;
    "all-linear" targets every linear layer but the head). The adapters of bf16/fp16 models
    are kept in float32. Returns the PeftModel, in the mode `model` was in.
    """
    check_lora_table(table)
    if not table:
        raise ConfigError.message("model.lora", "model.lora: empty table (set at least r) or leave it out")
    peft = _peft()
    kwargs = dict(r=table["r"], lora_alpha=table.get("alpha", table["r"]), bias="none", task_type="CAUSAL_LM",
                  lora_dropout=float(table.get("dropout", 0.0)))
    if "target_modules" in table:
        kwargs["target_modules"] = table["target_modules"]
    try:
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    except ValueError as err:  # target modules not found, no default for the family, ...
        raise ConfigError.message("model.lora.target_modules",
                                  f"model.lora.target_modules: {str(err).splitlines()[0]}") from None
    check_head(wrapped)
    wrapped.train(model.training)
    return wrapped


def check_head(model: torch.nn.Module) -> None:
    """ConfigError when the LM head or the input embeddings carry an adapter (the fused kernels read the plain head)."""
    inner = unwrap(model)
    modules = (("LM head", inner.get_output_embeddings()), ("input embeddings", inner.get_input_embeddings()))
    for what, module in modules:
        if module is not None and hasattr(module, "lora_A"):
            raise ConfigError.message("model.lora.target_modules",
                                      f"model.lora.target_modules: the {what} got an adapter; the fused LM-head "
                                      "kernels read its plain weight, so leave it out of the targets")


def unwrap(model: Any) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper or an `AdapterDisabled` view (the model itself otherwise)."""
    if isinstance(model, AdapterDisabled):
        model = model.policy
    return model.get_base_model() if is_peft_model(model) else model


class AdapterDisabled:
    """The reference of a LoRA run: the policy seen with its adapters switched off.

    It holds no weights of its own: `causal_lm.hidden_states` runs the policy inside
    ``policy.disable_adapter()``. Attributes (parameters, config, training, eval/train) are the
    policy's.
    """

    def __init__(self, policy: torch.nn.Module):
        if not is_peft_model(policy):
            raise TypeError(f"policy: expected a PEFT model, got {type(policy).__name__}")
        self.policy = policy

    def __getattr__(self, name: str):
        return getattr(self.__dict__["policy"], name)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[torch.nn.Module]:
        """Context: the transformers model with every adapter off (restored on exit)."""
        with self.policy.disable_adapter():
            yield unwrap(self.policy)

    def __repr__(self) -> str:
        return f"AdapterDisabled({type(unwrap(self.policy)).__name__})"


def base_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy of the transformers model under the adapters, adapters left out (PPO's critic)."""
    if not is_peft_model(model):
        raise TypeError(f"model: expected a PEFT model, got {type(model).__name__}")
    return copy.deepcopy(model).unload().requires_grad_(True)


def adapter_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter weights only, under PEFT's saved names (no adapter name in the keys)."""
    return _peft().get_peft_model_state_dict(model)


def save_adapter(model: torch.nn.Module, path) -> None:
    """adapter_model.safetensors + adapter_config.json in `path` (PEFT's layout, loadable with PeftModel)."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(str(path))


def load_adapter(model: torch.nn.Module, path) -> None:
    """Load the adapter weights saved by `save_adapter` into `model`; ValueError when they do not match."""
    from safetensors.torch import load_file

    peft = _peft()
    file = Path(path) / ADAPTER_FILE
    if not file.is_file():
        raise ValueError(f"{path}: no {ADAPTER_FILE} (a LoRA run's checkpoint holds the adapters only)")
    state = load_file(str(file))
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: adapter weights do not match the model's adapters: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {shapes[:3]} (is model.lora the same?)")
    peft.set_peft_model_state_dict(model, state)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The transformers model's state dict with each adapted weight replaced by W + scale * B A.

    Names are the plain model's (".base_layer" dropped, adapter tensors left out); merged tensors
    are new (one adapted matrix at a time), every other tensor is the model's own.
    """
    inner = unwrap(model)
    adapter = model.active_adapter
    deltas = {}
    for name, module in inner.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") \
                and adapter in getattr(module, "lora_A", {}):
            deltas[f"{name}.base_layer.weight"] = module
    state = {}
    for key, tensor in inner.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            delta = deltas[key].get_delta_weight(adapter)
            tensor = (tensor.float() + delta.float()).to(tensor.dtype)
        state[key.replace(".base_layer.", ".")] = tensor
    return state


def save_merged(model: torch.nn.Module, path, tokenizer=None) -> None:
    """The merged model (W + scale * B A) in the save_pretrained layout, loadable without PEFT; the adapter
    itself goes to `path`/adapter. The model being trained is not changed."""
    os.makedirs(path, exist_ok=True)
    unwrap(model).save_pretrained(str(path), state_dict=merged_state_dict(model))
    save_adapter(model, Path(path) / "adapter")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))

