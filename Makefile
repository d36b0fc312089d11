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

.PHONY: test test-fast demo bench bench-cpu install clean

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

# CPU micro-benchmarks (pytest-benchmark): saved under .benchmarks/, compared with the last saved run.
# Process CPU time, not wall time: on a shared machine wall time also counts other processes.
bench-cpu: $(STAMP)
	$(PY) -m pytest bench/test_cpu_bench.py -q -p no:cacheprovider --benchmark-enable --benchmark-autosave \
		--benchmark-compare --benchmark-group-by=group --benchmark-columns=min,median,max,rounds \
		--benchmark-timer=time.process_time

clean:
	rm -rf $(VENV) build *.egg-info fusedrl/*.so fusedrl/kernels/*.so
