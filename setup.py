"""Builds the C++ core `fusedrl._C` (sequence packing and balancing) with pybind11.

Metadata lives in pyproject.toml. Set FUSEDRL_NO_EXT=1 to skip the extension;
the pure-Python implementation in `fusedrl.packing` then serves the same API.

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

ext_modules = []
sources = sorted(glob.glob("csrc/*.cpp"))
if sources and os.environ.get("FUSEDRL_NO_EXT") != "1":
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules.append(
        Pybind11Extension(
            "fusedrl._C",
            sources,
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithExamples})
