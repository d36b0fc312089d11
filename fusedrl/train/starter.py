"""`fusedrl init STAGE [DIR]`: a starter config and its small data, from the examples shipped in the package.

    write_starter("sft", "my-run")     # my-run/sft.toml, my-run/data/sft_{train,eval}.jsonl

The examples (examples/*_tiny.toml and examples/data/*.jsonl in the repository) ship inside the wheel
as fusedrl/examples/ (setup.py copies them at build time); a source checkout reads them from
examples/. The written config points at DIR's data with paths relative to DIR, so
`cd DIR && fusedrl train STAGE.toml` runs it (a tiny model built from scratch, on CPU).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import fusedrl

# starter name -> (example file, run.stage it sets, or None to keep the example's)
_PG_VARIANTS = ("grpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo", "rloo", "reinforce")
STARTERS: Dict[str, tuple] = {
    "sft": ("sft_tiny.toml", None), "reward_model": ("reward_model_tiny.toml", None),
    "prm": ("prm_tiny.toml", None), "rejection": ("rejection_tiny.toml", None),
    "dpo": ("dpo_tiny.toml", None), "ppo": ("ppo_tiny.toml", None), "distill": ("distill_tiny.toml", None),
    **{name: ("grpo_tiny.toml", name) for name in _PG_VARIANTS},
}
_DATA_REF = re.compile(r"examples/data/([A-Za-z0-9_.-]+\.jsonl)")
_EXAMPLE_REF = re.compile(r"examples/([A-Za-z0-9_.-]+\.toml)")


class StarterError(ValueError):
    """An unknown starter name, or a target that would overwrite files."""


def examples_dir() -> Path:
    """The shipped examples: fusedrl/examples in an installed wheel, else examples/ of a source checkout."""
    package = Path(fusedrl.__file__).resolve().parent
    for candidate in (package / "examples", package.parent / "examples"):
        if (candidate / "sft_tiny.toml").is_file():
            return candidate
    raise FileNotFoundError(f"the fusedrl examples are missing from this installation ({package / 'examples'}); "
                            "reinstall fusedrl")


def _set_stage(text: str, stage: str) -> str:
    new, count = re.subn(r'(?m)^stage = "[a-z_]+"$', f'stage = "{stage}"', text, count=1)
    if count != 1:  # pragma: no cover (every shipped example sets [run] stage)
        raise StarterError(f"STAGE: the example has no [run] stage line to set to {stage!r}")
    return new.replace('out_dir = "runs/grpo-tiny"', f'out_dir = "runs/{stage.replace("_", "-")}-tiny"')


def _starter_of(file: str, name: str, example: str) -> str:
    """The starter name that a reference to the example `file` becomes (`fusedrl init` writes NAME.toml)."""
    if file == example:
        return name
    return next((n for n, (f, _) in STARTERS.items() if f == file), Path(file).stem)


def starter_text(name: str) -> tuple:
    """(config text, data file names) of starter `name`, with paths relative to the target folder."""
    if name not in STARTERS:
        raise StarterError(f"STAGE: expected one of {sorted(STARTERS)}, got {name!r}")
    example, stage = STARTERS[name]
    text = (examples_dir() / example).read_text()
    data = sorted(set(_DATA_REF.findall(text)))
    if stage is not None:
        text = _set_stage(text, stage)
    text = text.replace("examples/data/", "data/").replace("examples/data", "data")
    text = _EXAMPLE_REF.sub(lambda m: f"{_starter_of(m.group(1), name, example)}.toml", text)
    text = text.replace("# from the repository root", "# from the folder fusedrl init wrote")
    header = (f"# Written by `fusedrl init {name}` (fusedrl {fusedrl.__version__}) from examples/{example}.\n"
              f"# Run it from this folder:  fusedrl train {name}.toml\n#\n")
    return header + text, data


def write_starter(name: str, target: str | Path = ".", *, force: bool = False) -> List[Path]:
    """Write TARGET/NAME.toml and the data it reads (TARGET/data/*.jsonl); returns the files written.

    Raises:
        StarterError naming STAGE or DIR: an unknown starter, or files that exist (unless `force`).
    """
    text, data = starter_text(name)
    target = Path(target)
    outputs = [target / f"{name}.toml"] + [target / "data" / f for f in data]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not force:
        raise StarterError(f"DIR: {', '.join(existing)} already exist; pass --force to overwrite, "
                           "or choose another folder")
    if target.exists() and not target.is_dir():
        raise StarterError(f"DIR: {target} exists and is not a folder")
    (target / "data").mkdir(parents=True, exist_ok=True)
    outputs[0].write_text(text)
    source = examples_dir() / "data"
    for file, out in zip(data, outputs[1:]):
        out.write_bytes((source / file).read_bytes())
    return outputs
