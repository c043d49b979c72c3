"""The decode kernel (codellm/_decode_kernel.c) is built where a C compiler is found; without one,
codellm installs as before and runs its decode step through PyTorch."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("codellm._decode_kernel", ["codellm/_decode_kernel.c"],
                             extra_compile_args=["-O3", "-fno-math-errno", "-fopenmp"],
                             extra_link_args=["-fopenmp"], optional=True)])
