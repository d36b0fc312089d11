"""Record content checks at load (`fusedrl.data.validate` through `load_records`): each bad record is
named with file:line, or dropped and counted with on_bad="drop"."""
import json
import logging

import pytest

from fusedrl.data.records import load_records
from fusedrl.data.validate import MAX_RECORD_CHARS, check_data_file, screen_records

GOOD = {"prompt": "p", "completion": "c", "label": True}


def _file(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad, needle", [
    ({**GOOD, "label": 2}, "label: expected true, false, 0 or 1, got 2"),
    ({**GOOD, "label": -1}, "label"),
    ({**GOOD, "completion": ""}, "completion: is empty"),
    ({**GOOD, "prompt": [{"role": "user", "content": " "}]}, "prompt[0].content: is empty"),
    ({**GOOD, "prompt": [{"role": "robot", "content": "hi"}]}, "prompt[0].role: unknown chat role 'robot'"),
    ({**GOOD, "margin": "1"}, "margin: expected a finite number"),
    ({**GOOD, "margin": True}, "margin"),
])
def test_unpaired_records(tmp_path, bad, needle):
    path = _file(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(ValueError, match="^" + str(path) + ":3: " + needle.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        load_records(str(path))
    assert len(load_records(str(path), on_bad="drop")) == 2


def test_labels_zero_and_one_are_accepted(tmp_path):
    assert len(load_records(str(_file(tmp_path, [{**GOOD, "label": 0}, {**GOOD, "label": 1}, GOOD])))) == 3


@pytest.mark.parametrize("margin", ["NaN", "Infinity", "-Infinity"])
def test_a_nonfinite_margin_is_named(tmp_path, margin):
    row = '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": %s}' % margin
    path = _file(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5}, row])
    with pytest.raises(ValueError, match=f"{path}:2: margin: expected a finite number"):
        load_records(str(path))


def test_chosen_equal_rejected_and_messages(tmp_path):
    path = _file(tmp_path, [{"prompt": "p", "chosen": [{"role": "assistant", "content": "x"}],
                             "rejected": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(ValueError, match=f"{path}:1: chosen: equals rejected"):
        load_records(str(path))
    path = _file(tmp_path, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}])
    with pytest.raises(ValueError, match=r":1: messages\[1\].content: is empty"):
        load_records(str(path))


def test_an_oversized_record_is_refused_before_tokenisation(tmp_path):
    path = _file(tmp_path, [GOOD, {**GOOD, "completion": "x" * (MAX_RECORD_CHARS + 1)}])
    with pytest.raises(ValueError, match=f"{path}:2: record: {MAX_RECORD_CHARS + 2} characters"):
        load_records(str(path))


def test_drop_logs_the_count_and_the_first_reason(tmp_path, caplog):
    path = _file(tmp_path, [GOOD, {**GOOD, "completion": ""}, {**GOOD, "label": 5}, GOOD])
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        assert len(load_records(str(path), on_bad="drop")) == 2
    assert f"dropped 2 of 4 records" in caplog.text and f"{path}:2: completion: is empty" in caplog.text


def test_policy_and_paths_are_checked():
    with pytest.raises(ValueError, match="data.on_bad_record"):
        screen_records([], on_bad="skip")
    with pytest.raises(ValueError, match="data.train: no training data"):
        check_data_file("", "data.train", required=True)
    check_data_file(None, "data.eval", required=False)
