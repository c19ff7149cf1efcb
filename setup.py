"""Builds the optional native CPU kernels (src/gptoss/ops/native/); everything else is in
pyproject.toml. Without a C compiler or OpenMP the package still installs and runs on PyTorch."""

import sys
from pathlib import Path

from setuptools import Extension, setup

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
# The kernels are split over files of one concern each; link-time optimisation inlines across them
# as one file would, and hidden visibility keeps their calls direct (only PyInit__native is exported).
whole = ["-flto=auto", "-fvisibility=hidden"]
setup(
    ext_modules=[
        Extension(
            "gptoss.ops._native",
            sources=sorted(str(p) for p in Path("src/gptoss/ops/native").glob("*.c")),
            depends=sorted(str(p) for p in Path("src/gptoss/ops/native").glob("*.h")),
            extra_compile_args=["-O3", "-std=c11", *whole, *openmp],
            extra_link_args=["-O3", *whole, *openmp],
            optional=True,
        )
    ]
)
