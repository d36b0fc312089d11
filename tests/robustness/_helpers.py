"""Helpers of the robustness suite: tiny CLI runs, one-line error capture, folder snapshots."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, List, Tuple

from fusedrl.cli import main
from fusedrl.config_io import read_toml

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--logging.progress=false", "--logging.plots=false", "--run.num_threads=1"]
# A smaller model than the example's: every case trains in about a second.
SMALL = ["--model.arch.hidden_size=32", "--model.arch.intermediate_size=64", "--data.token_budget=256",
         "--data.max_len=32"]


def data_overrides(name: str) -> List[str]:
    data = read_toml(ROOT / "examples" / f"{name}.toml")["data"]
    return [f"--data.{key}={ROOT / data[key]}" for key in ("train", "eval") if data.get(key)]


def argv(name: str, out: Path, *extra: str, data: bool = True) -> List[str]:
    """`fusedrl train examples/NAME.toml` into OUT, 2 steps, a checkpoint every step."""
    base = ["train", str(ROOT / "examples" / f"{name}.toml"), f"--run.out_dir={out}", *QUIET, *SMALL,
            "--loop.max_steps=2", "--loop.eval_every=0", "--checkpoint.every=1"]
    return base + (data_overrides(name) if data else []) + list(extra)


def cli(args: List[str], capsys) -> Tuple[int, List[str], str]:
    """Run the CLI in-process; returns (exit code, its ERROR lines, all of stderr)."""
    capsys.readouterr()
    code = main(args)
    logging.getLogger("fusedrl").handlers[0].flush()
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if " ERROR " in line or line.startswith("ERROR")], err


def assert_one_line_error(code: int, errors: List[str], err: str, *needles: str) -> str:
    """Exit code 2, exactly one ERROR line, no traceback, and the line names every needle."""
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def snapshot(folder: Path) -> Dict[str, str]:
    """{relative path: sha256} of every file under `folder` ({} when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train_rows(out: Path) -> List[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]
