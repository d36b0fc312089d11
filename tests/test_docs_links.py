"""Docs drift: every link and repository path that README.md, docs/ and the code cite exists, and the
README's demo time has the form the demo prints."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
CODE = sorted((ROOT / "fusedrl").rglob("*.py")) + sorted((ROOT / "examples").glob("*.toml")) + \
    sorted((ROOT / "bench").glob("*.sh")) + [ROOT / "Makefile", ROOT / "setup.py", ROOT / "pyproject.toml"]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a repository path: a known top folder, then path characters, {a,b} alternatives (which may wrap a line)
DOC_TOPS = ("docs", "examples", "bench", "fusedrl", "tests")
CODE_TOPS = ("docs", "examples", "bench")  # what code cites for a reader (its own modules are imports)
BARE_DOC = re.compile(r"(?<![\w/.-])([a-z_]+\.md)\b")
BUILT = {"fusedrl/_C": "csrc/packing.cpp", "fusedrl/kernels/_cpu": "csrc/kernels_cpu.cpp"}  # C++ extensions, built from their sources


def expand(path: str):
    """Brace alternatives expanded: "a/{b,c}.py" -> ["a/b.py", "a/c.py"]."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [p for alt in match.group(1).split(",")
            for p in expand(path[:match.start()] + alt.strip() + path[match.end():])]


def missing_paths(text: str, tops=DOC_TOPS, globs: bool = True):
    """Cited repository paths that do not exist. Globs must match something (or, globs=False, are
    skipped: the code's globs name outputs such as bench/results/*.json); {x} without a comma is an
    f-string placeholder, not a path; a trailing '.' ends a sentence."""
    pattern = re.compile(rf"(?<![\w/.{{-])((?:{'|'.join(tops)})/(?:[\w./*-]|\{{[^{{}}]*\}})*)")
    missing = []
    for cited in pattern.findall(text):
        if any("," not in group for group in re.findall(r"\{([^{}]*)\}", cited)) or ("*" in cited and not globs):
            continue
        for path in expand(cited.rstrip(".")):
            path = BUILT.get(path.rstrip("."), path.rstrip("."))
            found = list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists() or (ROOT / f"{path}.py").exists()
            if not found:
                missing.append(path)
    return missing


def test_expand_and_the_path_pattern():
    assert expand("fusedrl/train/{parallel,dp_balance,\n fail_fast}.py") == [
        "fusedrl/train/parallel.py", "fusedrl/train/dp_balance.py", "fusedrl/train/fail_fast.py"]
    assert missing_paths("see `docs/engine.md`, fusedrl/train/{loop,nope}.py and examples/*.toml.") == [
        "fusedrl/train/nope.py"]
    assert missing_paths("runs/demo/plots/x.png and my_docs/x.md are not repository paths") == []
    assert missing_paths('f"bench/results/{name}.json", bench/results/*.json', CODE_TOPS, globs=False) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_markdown_links_resolve(doc):
    bad = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        if not (doc.parent / target.split("#")[0]).exists():
            bad.append(target)
    assert not bad, f"{doc.name} links to missing files: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_paths_cited_in_the_docs_exist(doc):
    text = doc.read_text()
    assert not missing_paths(text), f"{doc.name} cites missing paths: {missing_paths(text)}"
    bare = [name for name in BARE_DOC.findall(text)
            if name not in ("report.md",) and not (doc.parent / name).exists() and not (ROOT / "docs" / name).exists()]
    assert not bare, f"{doc.name} names missing documents: {bare}"


def test_paths_cited_in_the_code_exist():
    bad = {str(path.relative_to(ROOT)): missing_paths(path.read_text(), CODE_TOPS, globs=False) for path in CODE}
    assert not {k: v for k, v in bad.items() if v}


def test_readme_demo_time_has_the_form_the_demo_prints():
    from fusedrl.demo.pipeline import TOTAL_TIME

    readme = (ROOT / "README.md").read_text()
    pattern = re.escape(TOTAL_TIME).replace(re.escape("{:.0f}"), r"(\d+)")
    found = re.findall(pattern, readme)
    assert len(found) == 1, f"README.md should quote the demo's '{TOTAL_TIME}' once, found {found}"
    total = int(found[0])
    # the per-stage seconds of the README's table (the report's "| stage | task score | seconds |" rows)
    table = readme[readme.index("| stage | task score | seconds |"):].split("\n\n")[0]
    stages = [int(cells[3]) for cells in (row.split("|") for row in table.splitlines()[2:]) if cells[3].strip()]
    assert stages and 0.8 * total <= sum(stages) <= total, (stages, total)  # the rest: data, scoring, samples
