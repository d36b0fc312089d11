import pytest


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    """Every case runs from a folder that is not the repository root (no path may depend on the cwd)."""
    monkeypatch.chdir(tmp_path)
