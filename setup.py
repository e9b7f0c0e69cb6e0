"""Build the native core: cython/*.pyx + cython/src/*.c -> dsamig._native."""

from glob import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

native = Extension(
    "dsamig._native",
    sources=["cython/_native.pyx", *sorted(glob("cython/src/*.c"))],
    include_dirs=["cython/src", "cython/includes"],
    extra_compile_args=["-O3", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"],
    define_macros=[("_GNU_SOURCE", "1")],
)

setup(
    ext_modules=cythonize(
        [native],
        include_path=["cython/includes", "cython"],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
