"""Models: any transformers causal LM, run on packed batches, returning final hidden states.

    model = build_model(config={"model_type": "qwen2", "hidden_size": 64, ...})   # tests, demo
    model = build_model(name_or_path="Qwen/Qwen2.5-0.5B", device="cuda")           # real runs
    hidden = hidden_states(model, batch)        # (total, H), LM head not applied
    weight, bias = lm_head(model)               # for the fused loss: linear_logprobs(hidden, weight, ...)

The LM head runs inside the fused loss kernels, so the (total, V) logits are
never materialised. Packed batches go through the ``fusedrl_varlen`` attention
implementation (``fusedrl.models.packed_attention``) with explicit ``cu_seqlens``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from fusedrl.config import ConfigError
from fusedrl.data.batch import PackedBatch
from fusedrl.models.lora import AdapterDisabled, apply_lora, is_peft_model, save_merged, unwrap
from fusedrl.models.packed_attention import packed_forward

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype; None means bf16 on GPU, float32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype: expected a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def refuse_remote_code(name_or_path, key: str = "model.name_or_path") -> None:
    """ValueError when a local model folder's config.json asks to run its own code (auto_map)."""
    import json

    config = Path(name_or_path) / "config.json"
    if not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return  # transformers reports an unreadable config itself
    if auto_map:
        raise ConfigError.message(key, f"{key}: {str(name_or_path)!r} needs its own Python code (auto_map in config.json) "
                         "to load; set model.trust_remote_code = true only if you trust that code")


def build_model(*, name_or_path: Optional[str] = None, config: Optional[dict] = None, dtype=None,
                device=None, gradient_checkpointing: bool = False, attn_implementation: str = "sdpa",
                trust_remote_code: bool = False):
    """Build an ``AutoModelForCausalLM``.

    Args:
        name_or_path: a local ``save_pretrained`` folder or a hub id (loads weights).
        config: instead of ``name_or_path``, a config dict with ``model_type`` and
            its fields (e.g. ``{"model_type": "qwen2", "hidden_size": 64,
            "num_hidden_layers": 2, ...}``); weights are initialised from the global
            torch RNG, so seed it first.
        dtype: torch dtype or name; default bf16 on CUDA, float32 on CPU.
        device: where to put the model; default CUDA when available, else CPU.
        gradient_checkpointing: recompute each layer's activations in backward.
        attn_implementation: attention for plain (unpacked) calls and generation;
            ``hidden_states`` switches to ``fusedrl_varlen`` itself.
        trust_remote_code: let transformers run the folder's own Python code; always passed
            explicitly, so transformers never asks on stdin.

    Returns:
        The model, in train mode, on ``device`` in ``dtype``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (name_or_path is None) == (config is None):
        raise ValueError(f"build_model: pass exactly one of name_or_path and config, got "
                         f"name_or_path={name_or_path!r} and config={'a dict' if config is not None else None}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, device)
    if config is not None:
        if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
            raise ValueError(f"config: expected a dict with a 'model_type' string, got {config!r:.120}")
        fields = {k: v for k, v in config.items() if k != "model_type"}
        try:
            model_config = AutoConfig.for_model(config["model_type"], **fields)
        except ValueError as err:
            raise ValueError(f"config['model_type']: {err}") from None
        model_config._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    else:
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"name_or_path: expected a str path or hub id, got {type(name_or_path).__name__}")
        if not trust_remote_code:
            refuse_remote_code(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         attn_implementation=attn_implementation)
        except ValueError as err:
            if "trust_remote_code" not in str(err):
                raise
            raise ConfigError.message("model.name_or_path", f"model.name_or_path: {str(name_or_path)!r} needs its own Python code to load; set "
                             "model.trust_remote_code = true only if you trust that code") from None
    model.to(device)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with inputs that do not require grad and with FSDP2.
        enable_activation_checkpointing(model)
    model.config.use_cache = False  # training forwards; generation passes its own cache
    model.train()
    return model


def hidden_states(model, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states of ``model`` on a packed batch, the LM head NOT applied.

    Args:
        model: a transformers causal LM (e.g. from ``build_model``).
        batch: a ``PackedBatch`` on the model's device.

    Returns:
        (total, hidden_size) hidden states after the final norm, in the model's dtype;
        row t belongs to the document ``cu_seqlens`` puts it in, which never
        attends to another document.
    """
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch: expected a PackedBatch, got {type(batch).__name__}")
    if isinstance(model, AdapterDisabled):  # a LoRA run's reference: the policy with its adapters off
        with model.disabled() as inner:
            return hidden_states(inner, batch)
    model = unwrap(model)  # a PEFT-wrapped policy: its transformers model, LoRA layers in place
    device = next(model.parameters()).device
    if batch.input_ids.device != device:
        raise ValueError(f"batch: is on {batch.input_ids.device} but the model is on {device}; "
                         f"call batch.to({str(device)!r}) first")
    return packed_forward(model, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)


def lm_head(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The output projection: (weight (V, H), bias (V,) or None); tied to the embeddings when the model ties them."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: {type(model).__name__} has no output embedding (LM head)")
    if hasattr(head, "lora_A"):  # the kernels would read the base weight and silently skip the adapter
        raise ValueError("model: the LM head carries a LoRA adapter, which the fused LM-head kernels do not apply; "
                         "leave it out of model.lora.target_modules")
    return head.weight, getattr(head, "bias", None)


def save_model(model, path, tokenizer=None, *, merge_adapters: bool = False) -> None:
    """Save in the ``save_pretrained`` layout with safetensors weights (and the tokenizer if given).

    A LoRA (PEFT) model saves its adapters only, or with ``merge_adapters`` the merged weights
    (plus the adapters in ``path/adapter``): `fusedrl.models.lora.save_merged`.
    """
    if merge_adapters and is_peft_model(model):
        save_merged(model, path, tokenizer)
        return
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def check_arch(arch: dict) -> None:
    """ValueError naming model.arch.KEY when a value's type differs from the config class's default,
    or the head counts do not divide (num_attention_heads / num_key_value_heads / hidden_size)."""
    from transformers import AutoConfig

    if not isinstance(arch.get("model_type"), str):
        raise ConfigError.message("model.arch.model_type", f"model.arch.model_type: expected a string such as \"qwen2\", got {arch.get('model_type')!r}")
    try:
        defaults = AutoConfig.for_model(arch["model_type"])
    except ValueError as err:
        raise ConfigError.message("model.arch.model_type", f"model.arch.model_type: {err}") from None
    for key, value in arch.items():
        default = getattr(defaults, key, None)
        for tp in (bool, int, float):
            if isinstance(default, tp) and default is not None:
                ok = isinstance(value, bool) if tp is bool else (
                    isinstance(value, int) and not isinstance(value, bool) if tp is int
                    else isinstance(value, (int, float)) and not isinstance(value, bool))
                if not ok:
                    raise ConfigError.message("model.arch", f"model.arch.{key}: expected {tp.__name__}, got {value!r} "
                                     f"({type(value).__name__})")
                break
    heads, kv = arch.get("num_attention_heads"), arch.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        raise ConfigError.message("model.arch.num_attention_heads", f"model.arch.num_attention_heads ({heads}) must be a multiple of "
                         f"model.arch.num_key_value_heads ({kv})")
    hidden = arch.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden % heads \
            and "head_dim" not in arch:
        raise ConfigError.message("model.arch.hidden_size", f"model.arch.hidden_size ({hidden}) must be a multiple of "
                         f"model.arch.num_attention_heads ({heads})")


def build_policy(cfg, tokenizer, device: torch.device):
    """The model to train: loaded from name_or_path, or built from `arch` sized to the tokenizer;
    wrapped with LoRA adapters (PEFT) when `cfg.lora` is set (`fusedrl.models.lora.apply_lora`)."""
    model = _build_base_policy(cfg, tokenizer, device)
    lora = getattr(cfg, "lora", None)
    return apply_lora(model, lora) if lora else model


def _build_base_policy(cfg, tokenizer, device: torch.device):
    dtype = None if cfg.dtype == "auto" else cfg.dtype
    if cfg.name_or_path is not None:
        model = build_model(name_or_path=cfg.name_or_path, dtype=dtype, device=device,
                            gradient_checkpointing=cfg.gradient_checkpointing,
                            trust_remote_code=bool(getattr(cfg, "trust_remote_code", False)))
        vocab = model.get_input_embeddings().num_embeddings
        if tokenizer is not None and len(tokenizer) > vocab:
            raise ConfigError.message("model.tokenizer", f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens, more than the "
                             f"{vocab} embeddings of model {cfg.name_or_path!r}; use the model's own tokenizer")
        return model
    if not cfg.arch:
        raise ConfigError.message("model", "model: set model.name_or_path, or model.arch (with model_type) to build one from scratch")
    arch = dict(cfg.arch)
    check_arch(arch)
    arch.setdefault("vocab_size", len(tokenizer))
    for name in ("pad", "bos", "eos"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            arch.setdefault(f"{name}_token_id", token_id)
    if arch["vocab_size"] < len(tokenizer):
        raise ConfigError.message("model.arch.vocab_size", f"model.arch.vocab_size: {arch['vocab_size']} is smaller than the tokenizer ({len(tokenizer)})")
    return build_model(config=arch, dtype=dtype, device=device, gradient_checkpointing=cfg.gradient_checkpointing)


def load_reference(cfg, path: Optional[str], policy: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference model, built from the config (never saved in a checkpoint).

    Args:
        cfg: the [model] table (name_or_path, dtype).
        path: an explicit reference (pg.ref_model, ppo.ref_model, dpo.reference), or None.
        policy: the policy, on its device, before any training.
    Returns:
        `path` loaded, else model.name_or_path loaded (the run's initial weights, so a resumed run
        gets the same reference), else a frozen copy of `policy` as it is now (a policy built from
        model.arch is rebuilt identically from the seed on resume, so the copy is too). Eval mode
        for loaded models, no gradients. A LoRA policy (PEFT) without `path`: an `AdapterDisabled`
        view of it (its adapters off: the base weights), not a second model.
    """
    if path is None and is_peft_model(policy):
        return AdapterDisabled(policy)  # LoRA: the same weights with the adapters off, no second model
    source = path or cfg.name_or_path
    if source is None:
        return copy.deepcopy(policy).requires_grad_(False)
    device = next(policy.parameters()).device
    ref = build_model(name_or_path=source, dtype=None if cfg.dtype == "auto" else cfg.dtype, device=device)
    return ref.eval().requires_grad_(False)


def token_logprobs(model, batch: PackedBatch, temperature: float = 1.0, return_entropy: bool = False):
    """Per-position log p(label) of a packed batch (and the entropy) through the fused LM-head kernel.

    The one packed log-prob function of the engine (SFT, DPO, RL old/reference log-probs):
    the final hidden states go straight into `fusedrl.kernels.linear_logprobs`, so the
    (tokens, vocab) logits are never materialised.

    Returns:
        (total,) float32, 0 where the label is ignored [, (total,) float32 entropy].
    """
    from fusedrl.kernels import linear_logprobs

    hidden = hidden_states(model, batch)  # (total, H)
    weight, bias = lm_head(model)  # (V, H), (V,) or None
    return linear_logprobs(hidden, weight, batch.labels, bias=bias, temperature=temperature,
                           return_entropy=return_entropy)


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (non-reentrant: works with inputs that do not
    require grad and with FSDP2), through transformers' current API (no deprecated call)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
