"""Builds the C++ extensions with pybind11: `fusedrl._C` (sequence packing and balancing) and
`fusedrl.kernels._cpu` (vectorised CPU loops of the kernels: k3 KL).

Metadata lives in pyproject.toml. Set FUSEDRL_NO_EXT=1 to skip the extensions;
the pure-Python implementation in `fusedrl.packing` and the PyTorch paths of the
kernels then serve the same API.

The examples (examples/*.toml, examples/data/*.jsonl) are copied into the built package as
fusedrl/examples, which `fusedrl init` reads; a source checkout reads examples/ directly.
"""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithExamples(build_py):
    """build_py, then the examples into BUILD_LIB/fusedrl/examples (package data of the wheel)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads examples/ of the checkout
        for pattern in ("examples/*.toml", "examples/data/*.jsonl"):
            for source in sorted(glob.glob(pattern)):
                target = os.path.join(self.build_lib, "fusedrl", source)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(source, target)

# extension -> its sources: the packing core, and the kernels layer's CPU loops (kept apart so
# that the layers stay one-way: fusedrl.kernels imports nothing above it)
EXTENSIONS = {"fusedrl._C": ["csrc/packing.cpp"],
              "fusedrl.kernels._cpu": ["csrc/kernels_cpu.cpp", "csrc/kl.cpp", "csrc/policy_loss.cpp"]}
ext_modules = []
if os.environ.get("FUSEDRL_NO_EXT") != "1":
    from pybind11.setup_helpers import Pybind11Extension

    for name, sources in EXTENSIONS.items():
        ext_modules.append(Pybind11Extension(name, sources, cxx_std=17, extra_compile_args=["-O3"]))

setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithExamples})
