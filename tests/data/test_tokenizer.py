"""The character tokenizer: round trip, special tokens, chat template and assistant mask, save/load."""
import pytest
from transformers import AutoTokenizer

from fusedrl.data.tokenizer import DEFAULT_ALPHABET, SPECIAL_TOKENS, build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_round_trip_one_token_per_char(tok):
    text = "Reverse 'abc', then add 12+7!\n\tok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert len(tok) == len(SPECIAL_TOKENS) + len(DEFAULT_ALPHABET)


def test_special_tokens_and_unknown(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok.encode("a<eos>b<|user|>", add_special_tokens=False)
    assert ids == [tok.convert_tokens_to_ids("a"), 2, tok.convert_tokens_to_ids("b"),
                   tok.convert_tokens_to_ids("<|user|>")]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.encode("é", add_special_tokens=False) == [tok.unk_token_id]


def test_custom_alphabet_and_bad_alphabet():
    small = build_char_tokenizer("0123456789+=")
    assert len(small) == len(SPECIAL_TOKENS) + 12
    assert small.decode(small.encode("12+3=15", add_special_tokens=False)) == "12+3=15"
    with pytest.raises(ValueError, match="alphabet: characters must be unique"):
        build_char_tokenizer("aba")
    with pytest.raises(ValueError, match="alphabet: expected a non-empty str"):
        build_char_tokenizer("")


def test_chat_template_and_assistant_mask(tok):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "cd"},
        {"role": "user", "content": "e"},
        {"role": "assistant", "content": "f"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><|system|>s<eos><|user|>ab<eos><|assistant|>cd<eos><|user|>e<eos><|assistant|>f<eos>"
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask) == 18
    trained = [tok.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    # Assistant content and its closing <eos>; never the role marker or the user turn.
    assert trained == ["c", "d", "<eos>", "f", "<eos>"]


def test_generation_prompt(tok):
    messages = [{"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "<|user|>", "h", "i", "<eos>", "<|assistant|>"]


def test_unknown_role_is_an_error(tok):
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "12+3"}, {"role": "assistant", "content": "15"}]
    kw = dict(return_dict=True, return_assistant_tokens_mask=True)
    assert loaded.apply_chat_template(messages, **kw) == tok.apply_chat_template(messages, **kw)
    assert loaded.encode("x y", add_special_tokens=False) == tok.encode("x y", add_special_tokens=False)
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id
