"""Builds the C++ core `fusedrl._C` (sequence packing and balancing) with pybind11.

Metadata lives in pyproject.toml. Set FUSEDRL_NO_EXT=1 to skip the extension;
the pure-Python implementation in `fusedrl.packing` then serves the same API.
"""
import glob
import os

from setuptools import setup

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

setup(ext_modules=ext_modules)
