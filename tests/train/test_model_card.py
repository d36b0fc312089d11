"""The model card in final/README.md: Hugging Face front matter, stage, base model, data hashes, metrics."""
import hashlib
from types import SimpleNamespace

import pytest
import yaml

import fusedrl
from fusedrl.config import TrainConfig, load_config
from fusedrl.train.model_card import file_sha256, hub_model_id, model_card, write_model_card


def split_card(text):
    """(front matter as a dict, markdown body) of a model card."""
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def _cfg(tmp_path, name_or_path, stage="dpo"):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cfg = TrainConfig()
    cfg.run.stage, cfg.run.out_dir = stage, str(tmp_path / "runs" / "my-run")
    cfg.model.name_or_path = name_or_path
    cfg.data.train, cfg.data.eval = str(train), "hf:org/not-local"
    return cfg, hashlib.sha256(train.read_bytes()).hexdigest()


def test_card_front_matter_parses_and_names_stage_base_model_data_and_metrics(tmp_path):
    cfg, digest = _cfg(tmp_path, "Qwen/Qwen2-0.5B-Instruct")
    result = SimpleNamespace(last_metrics={"loss": 0.25, "accuracy": 0.75}, eval_metrics={"eval/loss": 0.5},
                             state=SimpleNamespace(step=7))
    path = write_model_card(tmp_path / "final", cfg, result)
    meta, body = split_card(path.read_text())
    assert meta == {"library_name": "transformers", "base_model": "Qwen/Qwen2-0.5B-Instruct",
                    "tags": ["fusedrl", "dpo"], "pipeline_tag": "text-generation"}
    assert "# my-run" in body and "stage `dpo`, 7 optimizer steps, from `Qwen/Qwen2-0.5B-Instruct`" in body
    assert f"| train | `{cfg.data.train}` | `{digest}` |" in body
    assert "| eval | `hf:org/not-local` | (not a local file) |" in body
    assert "| loss | 0.25 |" in body and "| eval/loss | 0.5 |" in body
    assert f"- fusedrl {fusedrl.__version__}" in body
    toml = body.split("```toml\n", 1)[1].split("\n```", 1)[0]
    (tmp_path / "resolved.toml").write_text(toml)
    assert load_config(tmp_path / "resolved.toml") == cfg  # the resolved config, complete


def test_local_or_scratch_models_have_no_base_model_key(tmp_path):
    local = tmp_path / "ckpt"
    local.mkdir()
    for name in (str(local), None):
        cfg, _ = _cfg(tmp_path, name, stage="reward_model")
        meta, body = split_card(model_card(cfg, {}, {}, steps=0))
        assert "base_model" not in meta and "pipeline_tag" not in meta  # a scalar head: no Hub pipeline
        assert meta["tags"] == ["fusedrl", "reward-model"]
    assert "architecture initialised from scratch" in body
    cfg, _ = _cfg(tmp_path, None, stage="dapo")
    assert split_card(model_card(cfg, {}, {}, steps=0))[0]["tags"] == ["fusedrl", "dapo", "rlhf",
                                                                       "reinforcement-learning"]


@pytest.mark.parametrize("name, hub", [("gpt2", "gpt2"), ("org/name", "org/name"), ("./org/name", None),
                                       ("/abs/path", None), ("a/b/c", None), ("", None), ("org/", None)])
def test_hub_model_id(name, hub):
    assert hub_model_id(name) == hub


def test_folder_hash_covers_names_and_contents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.arrow").write_bytes(b"x")
    first = file_sha256(tmp_path / "d")
    (tmp_path / "d" / "a.arrow").rename(tmp_path / "d" / "b.arrow")
    assert file_sha256(tmp_path / "d") != first and file_sha256(tmp_path / "missing") is None
