"""Hugging Face `datasets` sources (save_to_disk folders, local dataset folders, hf: names) and column mapping.

Nothing here downloads: every dataset is written to tmp_path first.
"""
import json
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")  # the `data` extra; in the dev extra, so installed for the tests

from fusedrl.cli import main  # noqa: E402
from fusedrl.config import DataConfig, load_config  # noqa: E402
from fusedrl.config_io import read_toml  # noqa: E402
from fusedrl.data.records import load_records  # noqa: E402
from fusedrl.data.sources import map_columns, parse_source, using_data_options  # noqa: E402
from fusedrl.data.validate import DataError, check_data_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
# record field -> the column name the "foreign" dataset uses for it
RENAMES = {
    "sft": {"prompt": "question", "completion": "response", "answer": "solution"},
    "prefs": {"prompt": "instruction", "chosen": "good", "rejected": "bad"},
    "prompts": {"prompt": "problem", "answer": "solution"},
}


def _jsonl(name: str) -> list:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def _foreign(rows: list, renames: dict) -> list:
    """The rows as a dataset with other column names would hold them (plus a column nobody maps)."""
    back = {field: column for field, column in renames.items()}
    return [{**{back.get(k, k): v for k, v in row.items()}, "source_id": i} for i, row in enumerate(rows)]


def _saved(tmp_path: Path, kind: str, *, splits: bool = True) -> Path:
    train = datasets.Dataset.from_list(_foreign(_jsonl(f"{kind}_train.jsonl"), RENAMES[kind]))
    test = datasets.Dataset.from_list(_foreign(_jsonl(f"{kind}_eval.jsonl"), RENAMES[kind]))
    folder = tmp_path / f"{kind}_saved"
    (datasets.DatasetDict({"train": train, "test": test}) if splits else train).save_to_disk(str(folder))
    return folder


def _without_source_id(records: list) -> list:
    return [{k: v for k, v in r.items() if k != "source_id"} for r in records]


@pytest.mark.parametrize("kind", ["sft", "prefs", "prompts"])
def test_saved_dataset_with_renamed_columns_gives_the_jsonl_records(tmp_path, kind):
    folder = _saved(tmp_path, kind)
    data = DataConfig(train=str(folder), eval=f"{folder}:test", columns=RENAMES[kind])
    with using_data_options(data):
        train, held_out = load_records(data.train), load_records(data.eval)
    assert _without_source_id(train) == _jsonl(f"{kind}_train.jsonl")
    assert _without_source_id(held_out) == _jsonl(f"{kind}_eval.jsonl")
    assert [r["source_id"] for r in train] == list(range(len(train)))  # unmapped columns are kept


def test_splits_come_from_the_config_or_the_suffix(tmp_path):
    folder = _saved(tmp_path, "sft")
    columns = RENAMES["sft"]
    with using_data_options(DataConfig(train=str(folder), eval=str(folder), columns=columns)):
        assert len(load_records(str(folder))) == len(_jsonl("sft_train.jsonl"))  # data.split = "train"
    with using_data_options(DataConfig(train=str(folder), split="test", columns=columns)):
        assert len(load_records(str(folder))) == len(_jsonl("sft_eval.jsonl"))
    with using_data_options(DataConfig(train=str(folder), split="validation", columns=columns)):
        with pytest.raises(DataError, match=r"has no split 'validation'; its splits are \['test', 'train'\]"):
            load_records(str(folder))
        assert len(load_records(f"{folder}:test")) == len(_jsonl("sft_eval.jsonl"))


def test_a_single_saved_dataset_and_a_local_dataset_folder(tmp_path):
    single = _saved(tmp_path, "prompts", splits=False)
    expected = _jsonl("prompts_train.jsonl")
    assert _without_source_id(load_records(str(single), columns=RENAMES["prompts"])) == expected
    folder = tmp_path / "local"  # a folder of data files: datasets.load_dataset(folder)
    folder.mkdir()
    (folder / "train.jsonl").write_text((DATA / "prompts_train.jsonl").read_text())
    assert parse_source(str(folder))[0] == "local"
    assert load_records(str(folder)) == expected


def test_an_unknown_mapped_column_names_it_and_lists_the_columns(tmp_path):
    folder = _saved(tmp_path, "prefs")
    with pytest.raises(DataError, match=r"data\.columns\.chosen: column 'better' is not in .*; its columns are "
                                        r"\['bad', 'good', 'instruction', 'source_id'\]"):
        load_records(str(folder), columns={**RENAMES["prefs"], "chosen": "better"})
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    with pytest.raises(DataError, match=r"data\.columns\.completion: column 'b' is not in .*\['a', 'q'\]"):
        load_records(str(path), columns={"prompt": "q", "completion": "b"})
    # the mapping runs before validation: a JSONL file with foreign names loads once mapped
    assert load_records(str(path), columns={"prompt": "q", "completion": "a"}) == [{"prompt": "x", "completion": "y"}]


def test_mapping_renames_and_overrides_a_column_of_the_target_name():
    rows = [("r0", {"prompt": "old", "question": "new", "x": 1})]
    assert map_columns(rows, {"prompt": "question"}, "src") == [("r0", {"prompt": "new", "x": 1})]
    assert map_columns(rows, {}, "src") is rows


def test_source_kinds_and_path_checks(tmp_path):
    folder = _saved(tmp_path, "sft")
    assert parse_source(str(folder)) == ("saved", str(folder), None)
    assert parse_source(f"{folder}:test") == ("saved", str(folder), "test")
    assert parse_source("hf:org/name:validation") == ("hub", "org/name", "validation")
    assert parse_source("hf:org/name") == ("hub", "org/name", None)
    assert parse_source("org/name") == ("hub", "org/name", None)
    assert parse_source(str(tmp_path / "missing" / "x"))[0] == "missing"
    check_data_file(str(folder), "data.train", required=True)
    check_data_file(f"{folder}:test", "data.eval", required=False)
    check_data_file("hf:org/name", "data.train", required=True)  # checked by the hub at load, not here
    with pytest.raises(DataError, match="data.train: .* does not exist"):
        check_data_file(str(tmp_path / "nope"), "data.train", required=True)
    with pytest.raises(DataError, match="data.eval: .* names no dataset"):
        check_data_file("hf:", "data.eval", required=False)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="data.train: .* is not a dataset folder or script"):
        check_data_file(str(tmp_path / "x.csv"), "data.train", required=True)


def test_missing_datasets_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    folder = _saved(tmp_path, "sft")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"needs the optional extra: pip install 'fusedrl\[data\]'") as err:
        load_records(str(folder))
    assert "\n" not in str(err.value)


def test_columns_are_validated_at_config_load(tmp_path):
    with pytest.raises(ValueError, match=r"data\.columns\.prompt: expected a column name"):
        load_config(None, [("data.columns", '{prompt = 3}')])
    with pytest.raises(ValueError, match=r"data\.columns\.answer: expected a column not already mapped"):
        load_config(None, [("data.columns", '{prompt = "q", answer = "q"}')])
    cfg = load_config(None, [("data.columns", '{prompt = "q"}'), ("data.columns.answer", '"a"')])
    assert cfg.data.columns == {"prompt": "q", "answer": "a"}


@pytest.mark.parametrize("stage,kind", [("sft", "sft"), ("dpo", "prefs"), ("grpo", "prompts")])
def test_fusedrl_train_from_a_saved_dataset(tmp_path, stage, kind):
    folder = _saved(tmp_path, kind)
    cfg = ROOT / "examples" / f"{stage}_tiny.toml"
    columns = "{" + ", ".join(f'{k} = "{v}"' for k, v in RENAMES[kind].items()) + "}"
    out = tmp_path / "run"
    argv = ["train", str(cfg), f"--run.out_dir={out}", "--logging.progress=false", "--logging.plots=false",
            "--run.num_threads=1", f"--data.train={folder}", f"--data.eval={folder}", f"--data.columns={columns}",
            "--loop.max_steps=2", "--loop.eval_every=0", "--checkpoint.save_final=false"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert any(r["kind"] == "eval" for r in rows)  # data.eval read the "test" split (data.eval_split)
    saved = read_toml(out / "config.toml")["data"]
    assert saved["columns"] == RENAMES[kind] and saved["eval_split"] == "test"


def test_an_unreachable_hub_dataset_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never touches the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"^source: 'hf:nobody-zz/nothing:test': ") as err:
        load_records("hf:nobody-zz/nothing:test")
    assert "\n" not in str(err.value)
