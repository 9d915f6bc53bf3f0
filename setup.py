"""Builds onnxsparse._native, the C++ sparse convolution kernels in kernels/ (metadata: pyproject.toml).

No -march flags: the AVX2/FMA paths carry their own target attributes and are chosen at run time,
so one build runs on any x86-64 CPU.
"""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

native = Pybind11Extension(
    "onnxsparse._native",
    sorted(glob("kernels/*.cpp")),
    include_dirs=["kernels"],
    depends=sorted(glob("kernels/*.h")),
    cxx_std=17,
    extra_compile_args=["-O3", "-fopenmp"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[native], cmdclass={"build_ext": build_ext})
