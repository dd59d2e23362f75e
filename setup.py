"""Build of noisynn_kernels: the Python package plus its C++ extension ``noisynn_kernels._C``.

The extension compiles against the PyTorch that is already installed, so install with
``--no-build-isolation`` (otherwise pip would fetch a second, multi-GB torch into a throw-away
build environment; torch is deliberately absent from ``[build-system] requires`` so that mistake
fails at once with this message instead).

Environment:
    MAX_JOBS          parallel compile jobs (ninja), as torch.utils.cpp_extension reads it.
    NOISYNN_DEBUG=1   build with -O0 -g.
"""

import os
import sys

from setuptools import setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "noisynn_kernels compiles its C++ extension against the installed PyTorch, and none was found in this "
        "build environment.\nInstall torch first, then this package without build isolation:\n"
        "    pip install torch ninja\n"
        "    pip install --no-build-isolation .\n"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_extension():
    debug = os.environ.get("NOISYNN_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"]  # the C++ standard is left to torch.utils.cpp_extension (it matches torch)
    return CppExtension(
        name="noisynn_kernels._C",
        sources=[os.path.relpath(os.path.join(HERE, *parts), HERE)
                 for parts in (("csrc", "extension.cpp"), ("csrc", "cpu", "mix_add_layernorm.cpp"))],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
