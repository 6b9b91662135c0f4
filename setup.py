# Metadata lives in pyproject.toml; this file only declares the native CPU loops
# (cws_kernels/native.c: plain C, loaded with ctypes). The build is optional: without a C
# compiler the package installs and the kernels use their PyTorch path.
from setuptools import Extension, setup

native = Extension(
    "cws_kernels._native",
    sources=["cws_kernels/native.c"],
    # -ffp-contract=off: no FMA, every product and sum rounds as the fp32 reference formula says
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-Wno-psabi"],
    optional=True,
)

setup(ext_modules=[native])
