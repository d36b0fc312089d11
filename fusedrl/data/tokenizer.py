"""A character-level tokenizer with a chat template, built locally (no download).

The demo and the tests need a tokenizer that behaves like a real Hugging Face
chat tokenizer (``apply_chat_template``, assistant masks, ``save_pretrained``)
without fetching anything. One token per character of ``alphabet``, plus
special tokens:

    <pad> <bos> <eos> <unk>          padding, sequence start, end of turn/sequence, unknown char
    <|system|> <|user|> <|assistant|> role markers opening each turn

A conversation renders as

    <bos><|user|>what is 2+3?<eos><|assistant|>5<eos>

Every turn ends with ``<eos>``, so a model trained on assistant turns learns to
stop there, and generation stops on ``eos_token_id``. Assistant content and its
``<eos>`` sit inside ``{% generation %}`` so ``return_assistant_tokens_mask=True``
marks exactly the tokens an SFT loss trains on; the role marker is prompt.
"""
from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS.values()]

# Printable ASCII without the rarely useful vertical tab / form feed / carriage return.
DEFAULT_ALPHABET = "".join(c for c in string.printable if c not in "\x0b\x0c\r")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ '; expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """Build a character-level chat tokenizer.

    Args:
        alphabet: the characters that get their own token (order fixes their ids,
            after the special tokens). Duplicates are an error; characters outside
            the alphabet encode to ``<unk>``.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad/bos/eos/unk`` tokens set, the role
        markers registered as special tokens, and ``chat_template`` set. Ids:
        special tokens 0..6 in ``SPECIAL_TOKENS`` order, then ``alphabet``.
    """
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"alphabet: expected a non-empty str, got {alphabet!r}")
    duplicates = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if duplicates:
        raise ValueError(f"alphabet: characters must be unique, got duplicates {duplicates!r}")
    clash = [t for t in SPECIAL_TOKENS if t in alphabet]
    if clash:
        raise ValueError(f"alphabet: must not contain special token strings {clash!r}")

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    # BPE with no merges and no pre-tokenizer splits any text into single characters;
    # Fuse() joins decoded characters without the default space separator.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tokenizer(cfg):
    """The run's tokenizer: the built-in char tokenizer, or one loaded with AutoTokenizer."""
    if cfg.tokenizer == "char":
        return build_char_tokenizer()
    source = cfg.name_or_path if cfg.tokenizer == "auto" else cfg.tokenizer
    if source is None:
        raise ValueError('model.tokenizer: "auto" needs model.name_or_path; with a model built from '
                         'model.arch set model.tokenizer = "char" or a tokenizer path')
    from transformers import AutoTokenizer
    # explicit: transformers never asks on stdin whether to run a folder's code
    return AutoTokenizer.from_pretrained(source, trust_remote_code=bool(getattr(cfg, "trust_remote_code", False)))
