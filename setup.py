"""Build hook for the optional compiled kernels (metadata is in pyproject.toml). Without a C
compiler the build goes on without them and voxarc computes the same features in numpy."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("models._kernels", ["models/_kernels.c"], optional=True,
                             extra_compile_args=["-O3"])])
