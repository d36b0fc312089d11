"""Imports go one way: kernels <- models/data <- rollout <- stages <- train <- cli; demo, bench, profile on top.

Two checks: every `import` statement in fusedrl (function-level ones too) names only allowed
layers, and each package imported alone in a fresh interpreter pulls in no forbidden fusedrl module.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fusedrl"

_BASE = {"kernels", "packing", "config"}
_CORE = ["data", "models", "rollout", "stages", "train"]
# layer -> the fusedrl layers it may import (itself is always allowed)
ALLOWED = {
    "kernels": set(),
    "packing": set(),
    "config": set(),
    "data": {"kernels", "packing", "config"},
    "models": _BASE | {"data"},
    "rollout": _BASE | {"data", "models"},
    "stages": _BASE | {"data", "models", "rollout"},
    "train": _BASE | {"data", "models", "rollout", "stages"},
    "integrations": _BASE | set(_CORE),
    "bench": _BASE | {"data", "models", "rollout"},
    "demo": _BASE | set(_CORE),
    "profile": _BASE | set(_CORE) | {"bench"},
    "cli": _BASE | set(_CORE) | {"demo", "bench", "profile"},
}
# top-level modules that are not packages, and the layer each belongs to
MODULE_LAYER = {"packing": "packing", "_packing_py": "packing", "_C": "packing", "config": "config",
                "config_io": "config", "cli": "cli", "__main__": "cli", "__init__": "root"}


def layer_of(module: str) -> str:
    """The layer of a dotted module name under fusedrl ("fusedrl.stages.sft" -> "stages")."""
    parts = module.split(".")
    if parts == ["fusedrl"]:
        return "root"
    top = parts[1]
    return MODULE_LAYER.get(top, top)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """Every fusedrl module named by an import statement in `path` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "fusedrl":  # `from fusedrl import stages` names the submodule
                for alias in node.names:
                    yield node.lineno, f"fusedrl.{alias.name}"
            else:
                yield node.lineno, name


def _sources():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_layer_is_known():
    layers = {layer_of(_module_name(p)) for p in _sources()} - {"root"}
    assert layers <= set(ALLOWED), f"place these packages in tests/test_layering.py ALLOWED: {layers - set(ALLOWED)}"


def _violations(path: Path, here: str):
    for lineno, name in _imports(path):
        if name != "fusedrl" and not name.startswith("fusedrl."):
            continue
        there = layer_of(name)
        if there not in ({here, "root"} | ALLOWED[here]):
            yield f"{path.name}:{lineno} ({here}) imports {name} ({there})"


def test_no_source_file_imports_a_higher_layer():
    bad = []
    for path in _sources():
        here = layer_of(_module_name(path))
        if here != "root":
            bad.extend(f"{path.parent.relative_to(ROOT)}/{v}" for v in _violations(path, here))
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


PACKAGES = ["fusedrl.kernels", "fusedrl.packing", "fusedrl.config", "fusedrl.data", "fusedrl.models",
            "fusedrl.rollout", "fusedrl.stages", "fusedrl.train", "fusedrl.bench", "fusedrl.demo", "fusedrl.cli",
            "fusedrl.profile"]
_PROBE = """
import importlib, json, pkgutil, sys
name = sys.argv[1]
module = importlib.import_module(name)
for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
    if not info.name.split(".")[-1].startswith("__"):
        importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m == "fusedrl" or m.startswith("fusedrl."))))
"""


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_alone_without_a_higher_layer(package):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _PROBE, package], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    here = layer_of(package)
    forbidden = [m for m in loaded if layer_of(m) not in ({here, "root"} | ALLOWED[here])]
    assert not forbidden, f"importing {package} loaded {forbidden}"


def test_the_checker_catches_a_forbidden_import():
    """The static check is not vacuous: a function-level upward import (and a relative one) is reported."""
    rogue = PKG / "stages" / "_rogue_for_test.py"
    rogue.write_text("def f():\n    from fusedrl.train.run import run_training\n    from ..demo import tasks\n")
    try:
        found = list(_violations(rogue, "stages"))
    finally:
        rogue.unlink()
    assert len(found) == 2 and "fusedrl.train.run (train)" in found[0] and "fusedrl.demo (demo)" in found[1], found
