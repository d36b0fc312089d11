"""Offline TRL fixtures: a word-level tokenizer and a tiny Llama saved to a folder, plus datasets."""
import torch

VOCAB = 64
WORDS = [f"w{i}" for i in range(4, VOCAB)]


def save_tiny(path, seed=0):
    """Write a tokenizer and a tiny float32 Llama to `path` (no network); returns str(path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{w: i for i, w in enumerate(WORDS, start=4)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).float().save_pretrained(path)
    return str(path)


def prompts(n=4, seed=0):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    rows = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3,), generator=gen)) for _ in range(n)]
    return Dataset.from_dict({"prompt": rows})


def preferences(n=4, seed=0):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)

    def text(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=gen))

    return Dataset.from_dict({"prompt": [text(3) for _ in range(n)], "chosen": [text(4) for _ in range(n)],
                              "rejected": [text(2 + i % 3) for i in range(n)]})


def reward_len_w5(completions, **kwargs):
    """A reward with spread across a group: length plus a bonus per "w5"."""
    return [float(len(c.split())) + 2.0 * c.split().count("w5") for c in completions]
