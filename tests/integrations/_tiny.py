"""Tiny causal LMs of each supported family, built from a config (no download), float32."""
import torch

VOCAB = 97


def tiny_config(family: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "mistral": tf.MistralConfig, "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config,
           "gemma3": tf.Gemma3TextConfig}[family]
    if family in ("qwen3", "gemma", "gemma2", "gemma3"):
        common["head_dim"] = 8
    if family in ("gemma2", "gemma3"):
        common.update(final_logit_softcapping=None, attn_logit_softcapping=None, query_pre_attn_scalar=8)
    common.update(overrides)
    return cls(**common)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    impl = "eager" if family == "gemma2" else "sdpa"  # transformers has no SDPA path for Gemma2
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).float()
    return model.eval()
