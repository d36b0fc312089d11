# Main commands: `make test` (everything, what CI runs), `make test-fast` (all but the tests marked
# `slow`: the demo and the ahead-of-time compiles) and `make demo`. Each sets up a virtual environment
# in .venv (idempotent: re-installs only when the project files change).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch on this kind of machine; override for another build.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
DEPS   := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: test test-fast demo bench install clean

$(STAMP): $(DEPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel pybind11
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/fusedrl demo

bench: $(STAMP)
	$(VENV)/bin/fusedrl bench

clean:
	rm -rf $(VENV) build *.egg-info fusedrl/*.so
