"""`fusedrl --version`, `fusedrl init STAGE [DIR]` (the written config trains), and a wheel that ships
the examples (fusedrl/examples, what `init` reads) and declares matplotlib, pyarrow and the extras."""
import glob
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import fusedrl
from fusedrl.cli import main
from fusedrl.train.run import load_run_config
from fusedrl.train.starter import STARTERS, examples_dir, write_starter

ROOT = Path(__file__).resolve().parents[2]


def test_version_from_the_cli_and_python_m(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"fusedrl {fusedrl.__version__}\n"
    out = subprocess.run([sys.executable, "-m", "fusedrl", "--version"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out == f"fusedrl {fusedrl.__version__}\n"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fusedrl.__version__"}


def test_every_starter_loads_as_its_stage_with_its_data(tmp_path, monkeypatch):
    assert examples_dir() == ROOT / "examples"  # a source checkout reads examples/
    monkeypatch.chdir(tmp_path)
    for name, (_, stage) in STARTERS.items():
        written = write_starter(name, name)
        assert written[0] == Path(name) / f"{name}.toml" and len(written) >= 2, written
        monkeypatch.chdir(tmp_path / name)
        cfg = load_run_config(f"{name}.toml")
        assert cfg.run.stage == (stage or load_run_config(str(examples_dir() / STARTERS[name][0])).run.stage)
        for path in (cfg.data.train, cfg.data.eval):
            assert path is None or (Path(path).is_file() and path.startswith("data/")), (name, path)
        monkeypatch.chdir(tmp_path)


def test_init_then_train_runs_and_writes_the_model_card(tmp_path, monkeypatch, capsys):
    yaml = pytest.importorskip("yaml")
    assert main(["init", "sft", str(tmp_path / "start")]) == 0
    out = capsys.readouterr().out
    assert f"next: cd {tmp_path / 'start'} && fusedrl train sft.toml" in out
    monkeypatch.chdir(tmp_path / "start")
    assert main(["train", "sft.toml", "--loop.max_steps=2", "--loop.eval_every=0", "--checkpoint.every=0",
                 "--logging.progress=false", "--sft.eval_micro_batches=1", "--logging.tensorboard=true"]) == 0
    run = tmp_path / "start" / "runs" / "sft-tiny"
    card = (run / "final" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["tags"] == ["fusedrl", "sft"] and "stage `sft`, 2 optimizer steps" in card
    assert (run / "final" / "model.safetensors").is_file() and (run / "plots" / "overview.png").is_file()
    assert glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))
    assert "![overview](plots/overview.png)" in (run / "report.md").read_text()


def test_init_errors_are_one_line(tmp_path, caplog):
    assert main(["init", "nope", str(tmp_path)]) == 2
    assert "STAGE: expected one of" in caplog.text
    assert main(["init", "dpo", str(tmp_path)]) == 0
    assert main(["init", "dpo", str(tmp_path)]) == 2 and "already exist; pass --force" in caplog.text
    assert main(["init", "dpo", str(tmp_path), "--force"]) == 0


def test_a_missing_sink_extra_stops_train_at_load(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["init", "sft", str(tmp_path)]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["train", "sft.toml", "--logging.wandb_project=p"]) == 2
    assert "logging.wandb_project: needs the 'wandb' package" in caplog.text
    assert not (tmp_path / "runs").exists()  # refused at load: nothing written


@pytest.mark.slow
def test_the_wheel_ships_the_examples_and_declares_the_dependencies(tmp_path):
    env = dict(os.environ, FUSEDRL_NO_EXT="1")  # the pure-Python packing: no compile, same files otherwise
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, env=env, capture_output=True, timeout=600)
    wheel = zipfile.ZipFile(glob.glob(str(tmp_path / "fusedrl-*.whl"))[0])
    names = set(wheel.namelist())
    shipped = {f"fusedrl/{p.relative_to(ROOT)}" for p in (ROOT / "examples").rglob("*")
               if p.suffix in (".toml", ".jsonl")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "fusedrl/__main__.py" in names and "fusedrl/train/plot.py" in names
    meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Version: {fusedrl.__version__}" in meta
    for line in ("Requires-Dist: matplotlib>=3.7", "Requires-Dist: pyarrow>=15", "Requires-Dist: transformers<6,>=5.0",
                 'Requires-Dist: tensorboard>=2.14; extra == "tensorboard"', 'Requires-Dist: wandb>=0.19; extra == "wandb"'):
        assert line in meta, line
    wheel.extractall(tmp_path / "site")  # installed layout: init reads fusedrl/examples from the package
    code = ("import fusedrl.train.starter as s; print(s.examples_dir()); "
            "print(s.write_starter('grpo', 'out')[0].read_text().count('data/prompts_train.jsonl'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path / "site"))).stdout.split()
    assert out == [str(tmp_path / "site" / "fusedrl" / "examples"), "1"]
