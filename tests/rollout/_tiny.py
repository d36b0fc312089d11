"""Tiny randomly initialised decoders built from configs (never downloaded) and a greedy oracle."""
import torch

VOCAB = 97


def tiny_model(family: str = "qwen2", seed: int = 0, **overrides):
    """A 2-layer float32 model of `family` (GQA 4 query heads over 2 kv heads, head dim 8)."""
    import transformers

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
    cls = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
           "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8, tie_word_embeddings=True)),
           "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None))}[family]
    kw.update(cls[2])
    kw.update(overrides)
    config = getattr(transformers, cls[0])(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, cls[1])(config).eval()
    # Larger matrices than the init give sharper, varied next-token distributions; a tied model
    # (qwen3 here) also needs a small embedding, or it keeps repeating its last token.
    tied = config.tie_word_embeddings
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(0.1 if tied and "embed" in name else 4.0 if tied else 2.0)
    return model


def random_prompts(count: int, low: int = 1, high: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def hf_greedy(model, prompt, max_new_tokens: int, stop_ids=()):
    """A plain argmax loop over full forwards of the HF model (no cache)."""
    ids = list(prompt)
    out = []
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=device)).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out
