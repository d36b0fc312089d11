"""Unclear errors made clear: each bad input stops the run at load with exit code 2 and one line naming
the input, before the model is built, and leaves the run folder as it was (here: not created)."""
import errno
import json

import pytest

from fusedrl.models.causal_lm import build_model, save_model

from tests.robustness._helpers import ROOT, argv, assert_one_line_error, cli, snapshot, train_rows

SFT_TRAIN = ROOT / "examples" / "data" / "sft_train.jsonl"


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _refused(tmp_path, capsys, extra, *needles, name="sft_tiny"):
    out = tmp_path / "run"
    line = assert_one_line_error(*cli(argv(name, out, *extra), capsys), *needles)
    assert not out.exists(), sorted(out.rglob("*"))
    return line


def test_missing_data_file(tmp_path, capsys):
    _refused(tmp_path, capsys, ["--data.train=/no/such/train.jsonl"], "data.train", "/no/such/train.jsonl",
             "does not exist")


def test_data_path_without_suffix(tmp_path, capsys):
    plain = tmp_path / "mydata"
    plain.write_text(SFT_TRAIN.read_text())
    _refused(tmp_path, capsys, [f"--data.train={plain}"], "data.train", "suffix")
    _refused(tmp_path, capsys, ["--data.train=./missing/thing"], "data.train", "not a file")


def test_non_utf8_bytes_name_the_file_and_line(tmp_path, capsys):
    lines = SFT_TRAIN.read_bytes().splitlines(keepends=True)
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b"".join(lines[:2]) + b'{"prompt": "caf\xe9", "completion": "x"}\n' + b"".join(lines[2:5]))
    _refused(tmp_path, capsys, [f"--data.train={bad}"], f"{bad}:3", "UTF-8")


def test_unknown_chat_role_names_the_file_and_line(tmp_path, capsys):
    data = _jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    _refused(tmp_path, capsys, [f"--data.train={data}", "--data.eval=none"], f"{data}:2", "'wizard'", "role")


def test_eval_file_of_another_format_says_it_is_the_eval_file(tmp_path, capsys):
    prefs = ROOT / "examples" / "data" / "prefs_eval.jsonl"
    _refused(tmp_path, capsys, [f"--data.eval={prefs}"], "data.eval", "eval file", "'preference'")


def test_missing_model_path(tmp_path, capsys):
    _refused(tmp_path, capsys, ["--model.name_or_path=./runs/nothing/final"], "model.name_or_path",
             "./runs/nothing/final")


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, capsys):
    small = build_model(config={"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "vocab_size": 50, "max_position_embeddings": 64}, device="cpu")
    save_model(small, tmp_path / "small")
    _refused(tmp_path, capsys, [f"--model.name_or_path={tmp_path / 'small'}"], "104 tokens", "50 embeddings")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta"], ids=["a-word", "bad-index", "meta"])
def test_invalid_device_string(tmp_path, capsys, device):
    _refused(tmp_path, capsys, [f"--run.device={device}"], "run.device", repr(device))


@pytest.mark.parametrize("override, key", [
    ("--model.arch.hidden_size=big", "model.arch.hidden_size"),
    ("--model.arch.num_key_value_heads=3", "model.arch.num_key_value_heads"),
    ("--optim.lr=inf", "optim.lr"),
    ("--optim.lr=nan", "optim.lr"),
    ("--run.out_dir=", "run.out_dir"),
    ("--optim.lrr=1", "optim.lrr"),
])
def test_bad_config_values_name_the_key(tmp_path, capsys, override, key):
    _refused(tmp_path, capsys, [override], key)


def test_negative_resample_rounds(tmp_path, capsys):
    _refused(tmp_path, capsys, ["--pg.resample_rounds=-1"], "pg.resample_rounds", name="grpo_tiny")


def test_out_dir_inside_a_file(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert_one_line_error(*cli(argv("sft_tiny", blocker / "run"), capsys), str(blocker), "not a folder")
    assert blocker.read_text() == "x"


def test_disk_full_during_a_checkpoint_is_one_line_and_resume_still_works(tmp_path, capsys, monkeypatch):
    import fusedrl.train.loop as loop
    real = loop.save_checkpoint

    def full_disk(root, step, **kwargs):
        if step == 2:
            partial = root / f".tmp-step_00000002-{json.loads((root.parent / 'run.json').read_text())['run_id']}-1"
            partial.mkdir()
            (partial / "optimizer.pt").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(partial / "optimizer.pt"))
        return real(root, step, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "save_checkpoint", full_disk)
    assert_one_line_error(*cli(argv("sft_tiny", out), capsys), "run.out_dir", "No space left on device",
                          "optimizer.pt")
    assert not (out / "run.lock").exists()
    monkeypatch.setattr(loop, "save_checkpoint", real)
    code, _, err = cli(argv("sft_tiny", out, "--resume", "--loop.max_steps=3"), capsys)
    assert code == 0, err
    assert not list((out / "checkpoints").glob(".tmp-*"))  # this run's leftover was cleaned up
    assert [r["step"] for r in train_rows(out)][-1] == 3


# ----------------------------------------------------------------------------- record content

@pytest.mark.parametrize("bad, needle", [
    ({"prompt": "reverse: ab", "completion": ""}, "completion: is empty"),
    ({"prompt": "  ", "completion": "ba"}, "prompt: is empty"),
])
def test_a_bad_record_is_named_or_dropped_and_counted(tmp_path, capsys, bad, needle):
    rows = SFT_TRAIN.read_text().splitlines()[:40]
    data = _jsonl(tmp_path / "train.jsonl", rows[:3] + [bad] + rows[3:])
    _refused(tmp_path, capsys, [f"--data.train={data}"], f"{data}:4", needle)
    out = tmp_path / "run"
    code, _, err = cli(argv("sft_tiny", out, f"--data.train={data}", "--data.on_bad_record=drop"), capsys)
    assert code == 0, err
    assert "dropped 1 of 41 records" in err and f"{data}:4" in err


def test_chosen_equal_to_rejected_is_named(tmp_path, capsys):
    rows = (ROOT / "examples/data/prefs_train.jsonl").read_text().splitlines()[:10]
    same = {"prompt": "reverse: ab", "chosen": "ba", "rejected": "ba"}
    data = _jsonl(tmp_path / "prefs.jsonl", rows[:1] + [same] + rows[1:])
    _refused(tmp_path, capsys, [f"--data.train={data}"], f"{data}:2", "chosen", "rejected", name="dpo_tiny")


def test_a_failed_load_leaves_an_existing_folder_unchanged(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv("sft_tiny", out), capsys)[0] == 0
    before = snapshot(out)
    data = _jsonl(tmp_path / "train.jsonl", [{"prompt": "reverse: ab", "completion": ""}])
    assert_one_line_error(*cli(argv("sft_tiny", out, "--overwrite", f"--data.train={data}"), capsys),
                          f"{data}:1")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    # --overwrite moved the old run aside before the data was read; nothing of it was lost
    assert len(aside) == 1 and snapshot(aside[0]) == before


def test_truncation_and_drops_are_logged_with_counts(tmp_path, capsys):
    code, _, err = cli(argv("sft_tiny", tmp_path / "run", "--data.max_len=22"), capsys)
    assert code == 0, err
    assert "examples truncated to data.max_len = 22" in err
    code, _, err = cli(argv("sft_tiny", tmp_path / "run2", "--data.max_len=22", "--data.overlong=drop"), capsys)
    assert code == 0, err
    assert "0 examples truncated" in err and "dropped as longer (data.overlong = 'drop')" in err


def test_rl_prompts_respect_the_prompt_length_limit(tmp_path, capsys):
    rows = (ROOT / "examples/data/prompts_train.jsonl").read_text().splitlines()[:20]
    data = _jsonl(tmp_path / "prompts.jsonl", rows[:4] + [{"prompt": "reverse: " + "abc" * 20, "answer": "x"}]
                  + rows[4:])
    extra = [f"--data.train={data}", "--data.eval=none"]
    _refused(tmp_path, capsys, extra, f"{data}:5", "data.max_len - rollout.max_new_tokens = 24", name="grpo_tiny")
    _refused(tmp_path, capsys, ["--data.max_len=8"], "data.max_len", "rollout.max_new_tokens", name="grpo_tiny")
    code, _, err = cli(argv("grpo_tiny", tmp_path / "run", *extra, "--data.on_bad_record=drop",
                            "--loop.max_steps=1", "--checkpoint.every=0"), capsys)
    assert code == 0, err
    assert "dropped 1 of 21 records" in err


def test_a_read_only_output_folder_is_named(tmp_path, capsys, monkeypatch):
    import fusedrl.train.run_dir as run_dir
    parent = tmp_path / "ro"
    parent.mkdir()
    # tests may run as root, for whom chmod does not make a folder read-only: fake what os.access reports
    monkeypatch.setattr(run_dir.os, "access", lambda path, mode: str(path) != str(parent))
    assert_one_line_error(*cli(argv("sft_tiny", parent / "run"), capsys), str(parent), "not writable")
    assert list(parent.iterdir()) == []


def test_unknown_options_of_the_config_command_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["config", "--stage", "grpo"], capsys)
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --stage grpo" in capsys.readouterr().err


def test_disk_errors_are_named_only_where_they_belong(tmp_path):
    from fusedrl.train.run import _disk_error
    run = tmp_path / "run"
    inside, outside = str(run / "checkpoints" / "x.pt"), str(tmp_path / "data.jsonl")
    assert _disk_error(OSError(errno.EACCES, "denied", inside), run).startswith(f"run.out_dir: cannot write {inside}")
    assert _disk_error(OSError(errno.EACCES, "denied", outside), run) is None  # a data file: not ours to rename
    assert _disk_error(OSError(errno.ENOSPC, "full", outside), run) == f"cannot write {outside}: No space left on device"
    assert _disk_error(OSError(errno.ENOENT, "missing", inside), run) is None


@pytest.mark.parametrize("name, extra, needles", [
    ("sft_tiny", ["--optim.lr=0"], ["optim.lr", "> 0"]),
    ("sft_tiny", ["--optim.lr=inf"], ["optim.lr", "finite"]),
    ("grpo_tiny", ["--pg.eps_low=1.5"], ["pg.eps_low", "[0, 1)"]),
    ("grpo_tiny", ["--pg.eps_low=-0.1"], ["pg.eps_low"]),
    ("grpo_tiny", ["--pg.adv_eps=0"], ["pg.adv_eps", "> 0"]),
    ("grpo_tiny", ["--pg.dual_clip=0.5"], ["pg.dual_clip", "> 1"]),
    ("grpo_tiny", ["--pg.kl_clamp=0"], ["pg.kl_clamp"]),
    ("grpo_tiny", ["--pg.kl_kind=k4"], ["pg.kl_kind", "k4"]),
    ("grpo_tiny", ["--pg.algo=ppo"], ["pg.algo", "run.stage"]),
    ("grpo_tiny", ["--pg.algo=dapo"], ["pg.algo", "contradicts", "'grpo'"]),
    ("ppo_tiny", ["--ppo.eps=1.5"], ["ppo.eps", "(0, 1)"]),
])
def test_policy_options_are_checked_at_load_naming_the_key(tmp_path, capsys, name, extra, needles):
    """Checked when the config loads (before any model or sample), named by their config key."""
    _refused(tmp_path, capsys, extra, *needles, name=name)
