"""Data: loading and validation, every format and its masking (token level), overlong policy, packing."""
import json
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fusedrl.data.batch import IGNORE_INDEX
from fusedrl.stages.groups import tokenize_groups
from fusedrl.data.records import (
    Example, PackedDataset, detect_format, load_records, pack_examples,
    tokenize_prompt, tokenize_records, tokenize_sft,
)
from fusedrl.data.tokenizer import build_char_tokenizer

CHAT = {"messages": [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "ab"},
    {"role": "assistant", "content": "cd"},
    {"role": "user", "content": "e"},
    {"role": "assistant", "content": "f"},
]}


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def trained(tok, example):
    """The trained tokens, as strings, in order."""
    return [tok.convert_ids_to_tokens(label) for label in example.labels if label != IGNORE_INDEX]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- loading

def test_load_jsonl_json_array_and_parquet(tmp_path):
    records = [{"prompt": "1+2", "completion": "3"}, {"prompt": "4+4", "completion": "8"}]
    jsonl = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in records] + [""])
    array = tmp_path / "b.json"
    array.write_text(json.dumps(records))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    for source in (jsonl, str(array), str(parquet)):
        assert load_records(source) == records


def test_bad_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", '])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        load_records(path)


def test_not_an_object_names_line(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", ['{"prompt": "a"}', "[1, 2]"])
    with pytest.raises(ValueError, match=r"list\.jsonl:2: expected a JSON object, got list"):
        load_records(path)


def test_unknown_format_and_bad_fields_name_line(tmp_path):
    path = write_jsonl(tmp_path / "keys.jsonl", ['{"prompt": "a"}', '{"question": "a"}'])
    with pytest.raises(ValueError, match=r"keys\.jsonl:2: record: unknown format, keys \['question'\]"):
        load_records(path)
    path = write_jsonl(tmp_path / "types.jsonl", ['{"prompt": "a", "completion": 3}'])
    with pytest.raises(ValueError, match=r"types\.jsonl:1: completion: expected a string or a list of messages, got int"):
        load_records(path)
    path = write_jsonl(tmp_path / "msg.jsonl", ['{"messages": [{"role": "user"}]}'])
    with pytest.raises(ValueError, match=r"msg\.jsonl:1: messages\[0\]: expected \{'role': str, 'content': str\}"):
        load_records(path)
    path = write_jsonl(tmp_path / "mixed.jsonl", ['{"prompt": "a"}', '{"prompt": "a", "completion": "b"}'])
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: record is in format 'prompt_completion' but earlier"):
        load_records(path)


def test_bad_parquet_row_is_named(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}]), path)
    with pytest.raises(ValueError, match=r"p\.parquet row 1: completion: expected a string"):
        load_records(str(path))


def test_sources_that_are_not_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed (no network use either way)
    with pytest.raises(ValueError, match=r"needs the optional extra: pip install 'fusedrl\[data\]'"):
        load_records("someone/some-dataset")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="source: unsupported file type"):
        load_records(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "missing.jsonl"))


def test_detect_format():
    assert detect_format(CHAT) == "messages"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "preference"
    assert detect_format({"prompt": "a", "completion": "b", "label": False}) == "unpaired"
    assert detect_format({"prompt": "a", "answer": "b"}) == "prompt"
    assert detect_format({"prompt": "a"}) == "prompt"
    with pytest.raises(ValueError, match="needs both 'chosen' and 'rejected'"):
        detect_format({"prompt": "a", "chosen": "b"})


# ----------------------------------------------------------------------------- masking

def test_messages_all_vs_last_assistant(tok):
    every = tokenize_sft(CHAT, tok, max_len=64, train_on="all_assistant")
    last = tokenize_sft(CHAT, tok, max_len=64, train_on="last_assistant")
    assert every.input_ids == last.input_ids == tok.apply_chat_template(CHAT["messages"], return_dict=True)["input_ids"]
    assert trained(tok, every) == ["c", "d", "<eos>", "f", "<eos>"]
    assert trained(tok, last) == ["f", "<eos>"]
    # Token level: labels are the tokens themselves (unshifted) exactly where trained.
    text = tok.convert_ids_to_tokens(every.input_ids)
    c = text.index("c")
    assert every.labels[c - 1] == IGNORE_INDEX and every.labels[c] == every.input_ids[c]
    assert last.labels[c] == IGNORE_INDEX


@pytest.mark.parametrize("fmt", ["prompt_completion", "unpaired"])
def test_prompt_completion_masks_the_prompt(tok, fmt):
    record = {"prompt": "12+3", "completion": "15"}
    if fmt == "unpaired":
        record["label"] = True
    example = tokenize_sft(record, tok, max_len=64)
    assert tok.convert_ids_to_tokens(example.input_ids) == [
        "<bos>", "<|user|>", "1", "2", "+", "3", "<eos>", "<|assistant|>", "1", "5", "<eos>"]
    assert example.labels[:8] == [IGNORE_INDEX] * 8
    assert example.labels[8:] == example.input_ids[8:]


def test_template_without_generation_tags_gives_the_same_masks(tok):
    plain = build_char_tokenizer()
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for train_on in ("all_assistant", "last_assistant"):
        assert tokenize_sft(CHAT, plain, max_len=64, train_on=train_on) == \
            tokenize_sft(CHAT, tok, max_len=64, train_on=train_on)
    record = {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": "r"}], "chosen": "yes", "rejected": "no"}
    for side in ("chosen", "rejected"):  # a preference side is a prompt + completion record (tokenize_groups)
        pair = {"prompt": record["prompt"], "completion": record[side]}
        assert tokenize_sft(pair, plain, max_len=64, train_on="last_assistant") == \
            tokenize_sft(pair, tok, max_len=64, train_on="last_assistant")


def test_preference_trains_only_the_completions(tok):
    record = {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": "r"}], "chosen": "yes", "rejected": "no"}
    examples, groups, _ = tokenize_groups([record], tok, max_len=64)  # how DPO and the RM tokenize pairs
    chosen, rejected = (examples[i] for i in groups[0])
    assert trained(tok, chosen) == ["y", "e", "s", "<eos>"]
    assert trained(tok, rejected) == ["n", "o", "<eos>"]  # the assistant turn "a" in the prompt is masked
    prompt = tokenize_prompt(record, tok)
    assert chosen.input_ids[: len(prompt)] == prompt == rejected.input_ids[: len(prompt)]


def test_tokenize_prompt(tok):
    ids = tokenize_prompt({"prompt": "hi", "answer": "x"}, tok)
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "<|user|>", "h", "i", "<eos>", "<|assistant|>"]
    ids = tokenize_prompt(CHAT, tok)  # drops the trailing assistant turn
    assert tok.decode(ids) == "<bos><|system|>s<eos><|user|>ab<eos><|assistant|>cd<eos><|user|>e<eos><|assistant|>"


def test_overlong_truncate_vs_drop(tok):
    record = {"prompt": "abc", "completion": "defgh"}  # 13 tokens, the prompt 7
    full = tokenize_sft(record, tok, max_len=64)
    assert len(full) == 13
    cut = tokenize_sft(record, tok, max_len=10, overlong="truncate")
    assert cut.input_ids == full.input_ids[:10] and cut.labels == full.labels[:10]
    assert tokenize_sft(record, tok, max_len=10, overlong="drop") is None
    assert tokenize_sft(record, tok, max_len=13, overlong="drop") == full
    # Truncating into the prompt leaves nothing to train: dropped too.
    assert tokenize_sft(record, tok, max_len=7, overlong="truncate") is None
    assert trained(tok, tokenize_sft(record, tok, max_len=8, overlong="truncate")) == ["d"]
    examples, dropped = tokenize_records([record, {"prompt": "a", "completion": "b"}], tok, max_len=10, overlong="drop")
    assert dropped == 1 and len(examples) == 1
    assert tokenize_sft({"prompt": "a", "completion": "bbbbbbbb"}, tok, max_len=10, overlong="drop") is None


def test_bad_options(tok):
    with pytest.raises(ValueError, match=r"train_on: expected one of \['all_assistant', 'last_assistant'\], got 'all'"):
        tokenize_sft(CHAT, tok, max_len=64, train_on="all")
    with pytest.raises(ValueError, match="overlong: expected one of"):
        tokenize_sft(CHAT, tok, max_len=64, overlong="split")
    with pytest.raises(ValueError, match="max_len: expected an int >= 2"):
        tokenize_sft(CHAT, tok, max_len=0)
    with pytest.raises(ValueError, match="tokenize_sft needs a messages or prompt/completion record"):
        tokenize_sft({"prompt": "a"}, tok, max_len=64)
    only_user = {"messages": [{"role": "user", "content": "hi"}]}
    assert tok.decode(tokenize_prompt(only_user, tok)) == "<bos><|user|>hi<eos><|assistant|>"
    with pytest.raises(ValueError, match=r"records\[1\]: messages: no assistant turn to train on"):
        tokenize_records([CHAT, only_user], tok, max_len=64)


# ----------------------------------------------------------------------------- packing

def random_examples(n, rng, low=2, high=12):
    examples = []
    for _ in range(n):
        length = rng.randint(low, high)
        ids = [rng.randint(7, 99) for _ in range(length)]
        labels = [t if rng.random() < 0.6 else IGNORE_INDEX for t in ids]
        examples.append(Example(ids, labels))
    return examples


def test_pack_examples_layout():
    rng = random.Random(0)
    examples = random_examples(23, rng)
    extras = [{"reward": float(i), "old_logp": [-(i + t / 10) for t in range(len(e))]} for i, e in enumerate(examples)]
    batches = pack_examples(examples, 25, extras=extras, token_keys=("old_logp",))
    seen = []
    for batch in batches:
        assert batch.total <= 25
        index = batch.extras["example_index"].tolist()
        seen += index
        lengths = [len(examples[i]) for i in index]
        assert batch.cu_seqlens.dtype == torch.int32
        assert batch.cu_seqlens.tolist() == [sum(lengths[:k]) for k in range(len(lengths) + 1)]
        assert batch.max_seqlen == max(lengths)
        assert batch.position_ids.tolist() == [p for n in lengths for p in range(n)]
        assert batch.extras["reward"].tolist() == [float(i) for i in index]
        for k, i in enumerate(index):
            start, end = batch.cu_seqlens[k].item(), batch.cu_seqlens[k + 1].item()
            example = examples[i]
            assert batch.input_ids[start:end].tolist() == example.input_ids
            # Shifted inside the document: position t predicts token t+1; the last token predicts nothing.
            assert batch.labels[start:end].tolist() == example.labels[1:] + [IGNORE_INDEX]
            assert batch.extras["old_logp"][start:end].tolist() == pytest.approx(extras[i]["old_logp"][1:] + [0.0])
        assert batch.num_tokens == int((batch.labels != IGNORE_INDEX).sum())
        assert batch.num_tokens == sum(examples[i].num_trained for i in index)
    assert sorted(seen) == list(range(len(examples)))


def test_pack_examples_errors():
    examples = [Example([1, 2, 3], [1, 2, 3]), Example([4] * 9, [4] * 9)]
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9 exceeds budget = 8"):
        pack_examples(examples, 8)
    with pytest.raises(ValueError, match="extras: expected a list of 2 dicts"):
        pack_examples(examples, 16, extras=[{"a": 1}])
    with pytest.raises(ValueError, match=r"token_keys: \['b'\] are not keys of extras"):
        pack_examples(examples, 16, extras=[{"a": 1}, {"a": 2}], token_keys=("b",))
    with pytest.raises(TypeError, match=r"examples\[0\]: expected an Example"):
        pack_examples([[1, 2]], 16)
    with pytest.raises(ValueError, match="labels: expected the length of input_ids"):
        Example([1, 2], [1])


def batches_equal(a, b):
    return all(
        torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        and torch.equal(x.cu_seqlens, y.cu_seqlens) and x.num_tokens == y.num_tokens
        and torch.equal(x.extras["example_index"], y.extras["example_index"])
        for x, y in zip(a, b)
    ) and len(a) == len(b)


def test_packed_dataset_epochs_and_resume():
    examples = random_examples(40, random.Random(1))
    dataset = PackedDataset(examples, 30, seed=7)
    per_epoch = len(dataset)
    first_epoch = dataset.next_batches(per_epoch)
    assert sorted(i for b in first_epoch for i in b.extras["example_index"].tolist()) == list(range(40))
    assert dataset.epoch == 0 and dataset.position == per_epoch
    uninterrupted = PackedDataset(examples, 30, seed=7)
    uninterrupted.next_batches(per_epoch + 3)
    state = uninterrupted.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    expected = uninterrupted.next_batches(per_epoch + 2)  # crosses into epoch 2
    resumed = PackedDataset(examples, 30, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert batches_equal(resumed.next_batches(per_epoch + 2), expected)
    # Epochs are reshuffled, and a different seed gives a different order.
    second = PackedDataset(examples, 30, seed=7)
    second.next_batches(per_epoch)
    assert not batches_equal(second.next_batches(per_epoch), first_epoch)
    assert not batches_equal(PackedDataset(examples, 30, seed=8).next_batches(per_epoch), first_epoch)
    fixed = PackedDataset(examples, 30, seed=7, shuffle=False)
    assert batches_equal(fixed.next_batches(per_epoch), fixed.next_batches(per_epoch))


def test_packed_dataset_bad_state():
    dataset = PackedDataset(random_examples(5, random.Random(2)), 30, seed=0)
    with pytest.raises(ValueError, match=r"state\['seed'\]: the checkpoint has 1, this dataset has 0"):
        dataset.load_state_dict({"epoch": 0, "position": 0, "seed": 1})
    with pytest.raises(ValueError, match=r"state\['position'\]: 99 is past"):
        dataset.load_state_dict({"epoch": 0, "position": 99})
    with pytest.raises(ValueError, match=r"n: expected an int >= 1"):
        dataset.next_batches(0)


def test_cached_renderings_match_fresh_ones_and_follow_the_template():
    """_render caches by (template, messages, flags): a repeat is served equal (and a copy the caller
    may change), and a changed chat template is rendered afresh, never served stale."""
    from fusedrl.data import records

    tok = build_char_tokenizer()
    record = {"prompt": "reverse: abc"}
    first = tokenize_prompt(record, tok)
    first.append(-1)  # the caller's list is its own
    again = tokenize_prompt(record, tok)
    fresh = list(tok.apply_chat_template([{"role": "user", "content": "reverse: abc"}], tokenize=True,
                                         return_dict=True, add_generation_prompt=True)["input_ids"])
    assert again == fresh == first[:-1]
    assert len(records._RENDER_CACHE[tok]) >= 1
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenize_prompt(record, tok) == tok.convert_tokens_to_ids(list("reverse: abc"))
