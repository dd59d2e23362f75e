"""Build of noisynn_kernels: the Python package plus its compiled extension ``noisynn_kernels._C``.

The extension compiles against the PyTorch that is already installed, so install with
``--no-build-isolation`` (otherwise pip would fetch a second, multi-GB torch into a throw-away
build environment; torch is deliberately absent from ``[build-system] requires`` so that mistake
fails at once with this message instead).

``_C`` always holds the C++ CPU kernels; the CUDA kernels (``csrc/cuda``) are added when nvcc and a
CUDA build of torch are present.  ``noisynn_kernels.backend_info()`` / ``_C.build_info()`` report
what was built.

Environment:
    NOISYNN_BUILD_CUDA     auto (default): build the CUDA kernels when nvcc and a CUDA build of torch
                           are both present; 1: require them (the build fails, saying what is missing);
                           0: CPU kernels only.  Any other value is an error.
    TORCH_CUDA_ARCH_LIST   GPU architectures of the CUDA kernels (default "8.0;9.0+PTX"; PTX for the highest
                           one is added when absent; e.g. "9.0" builds for H100 and newer, about half the
                           CUDA compile time).
    CUDA_HOME              the CUDA toolkit (default: the toolkit of the nvcc on PATH, else /usr/local/cuda).
    MAX_JOBS               parallel compile jobs (ninja), as torch.utils.cpp_extension reads it.
    NOISYNN_DEBUG=1        build with -O0 -g.

This file only builds when run as the setup script (pip runs it so); importing it, e.g.
``importlib`` from the tests, gives the configuration helpers below without building anything.
"""

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

#: Values of NOISYNN_BUILD_CUDA.
BUILD_CUDA_MODES = ("auto", "0", "1")
#: TORCH_CUDA_ARCH_LIST when it is unset: A100 and H100 class GPUs.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

CPU_SOURCES = (("csrc", "extension.cpp"), ("csrc", "ops.cpp"), ("csrc", "autograd.cpp"),
               ("csrc", "cpu", "mix_add_layernorm.cpp"), ("csrc", "cpu", "kernels_default.cpp"),
               ("csrc", "cpu", "kernels_avx2.cpp"))
CUDA_SOURCES = (("csrc", "cuda", "mix_add_layernorm.cu"), ("csrc", "cuda", "mix_add_layernorm_op.cpp"))


class BuildConfigError(ValueError):
    """An invalid or unsatisfiable build configuration (the message says what and how to fix it)."""


def cuda_build_mode(value):
    """The NOISYNN_BUILD_CUDA mode for the variable's value: ``"auto"`` (also when unset or empty),
    ``"0"`` or ``"1"``; any other value raises :class:`BuildConfigError`."""
    mode = "auto" if value is None else value.strip().lower()
    if mode == "":
        mode = "auto"
    if mode not in BUILD_CUDA_MODES:
        raise BuildConfigError(
            f"NOISYNN_BUILD_CUDA={value!r} is not a valid value; expected 'auto' (build the CUDA kernels when "
            "nvcc and a CUDA build of torch are present, the default), '1' (require them) or '0' (CPU kernels only)")
    return mode


def cuda_arch_list(environ):
    """TORCH_CUDA_ARCH_LIST from ``environ``, or :data:`DEFAULT_CUDA_ARCH_LIST` when unset or empty, with
    PTX for its highest architecture when no entry has any: a GPU newer than the build (say sm_100 for
    a 9.0 build) then JIT-compiles the kernels instead of failing every launch."""
    value = environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH_LIST
    if "+PTX" in value.upper():
        return value
    archs = value.replace(";", " ").split()
    try:
        top = max(archs, key=lambda a: tuple(int(p) for p in a.split(".")))
    except ValueError:  # a name torch understands ("Hopper", "9.0a"): leave it to torch as given
        return value
    sep = ";" if ";" in value else " "
    return sep.join(a + "+PTX" if a == top else a for a in archs)


def find_cuda_home(environ, which=shutil.which, exists=os.path.exists):
    """The CUDA toolkit to build with: CUDA_HOME / CUDA_PATH when set; else the toolkit of the nvcc on
    PATH (its real location, so a wrapper script or symlink in /usr/local/bin does not make
    /usr/local the toolkit); else /usr/local/cuda when it has nvcc; else ``None``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            return environ[var]
    nvcc = which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    if exists(os.path.join("/usr/local/cuda", "bin", "nvcc")):
        return "/usr/local/cuda"
    return None


def nvcc_version(cuda_home, run=subprocess.run):
    """The release of ``cuda_home/bin/nvcc`` (``"13.0"``), or ``None`` when it is missing or does not run."""
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def decide_cuda(mode, torch_cuda, cuda_home, nvcc_release):
    """Whether to build the CUDA kernels, and why: ``(build, reason)``.

    ``torch_cuda`` is ``torch.version.cuda`` (``None`` for a CPU-only torch), ``nvcc_release`` the
    version :func:`nvcc_version` found (``None``: no usable nvcc).  Mode ``"1"`` raises
    :class:`BuildConfigError` naming what is missing; ``"auto"`` builds CPU kernels only instead."""
    if mode == "0":
        return False, "NOISYNN_BUILD_CUDA=0"
    missing = []
    if torch_cuda is None:
        missing.append("the installed torch is a CPU-only build (torch.version.cuda is None)")
    if nvcc_release is None:
        where = f"CUDA_HOME={cuda_home} has no working bin/nvcc" if cuda_home else "no CUDA toolkit was found"
        missing.append(f"nvcc is missing ({where}; set CUDA_HOME or put the toolkit's bin/ on PATH)")
    elif torch_cuda is not None and nvcc_release.split(".")[0] != torch_cuda.split(".")[0]:
        missing.append(f"nvcc {nvcc_release} (in {cuda_home}) and torch's CUDA {torch_cuda} have different major "
                       "versions")
    if not missing:
        return True, f"nvcc {nvcc_release} in {cuda_home}, torch built with CUDA {torch_cuda}"
    why = "; ".join(missing)
    if mode == "1":
        raise BuildConfigError(f"NOISYNN_BUILD_CUDA=1 requires the CUDA kernels, but {why}")
    return False, why


def _sources(parts_list):
    return [os.path.join(*parts) for parts in parts_list]


def extension(build_cuda):
    """``noisynn_kernels._C``: a CppExtension, or a CUDAExtension with -DWITH_CUDA and the CUDA sources."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("NOISYNN_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp"]  # the C++ standard is left to torch.utils.cpp_extension (it matches torch)
    if not build_cuda:
        return CppExtension(name="noisynn_kernels._C", sources=_sources(CPU_SOURCES),
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    nvcc = opt + ["-lineinfo"]  # source lines in profiles (no effect on the generated code)
    return CUDAExtension(name="noisynn_kernels._C", sources=_sources(CPU_SOURCES + CUDA_SOURCES),
                         define_macros=[("WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


def main():
    try:
        mode = cuda_build_mode(os.environ.get("NOISYNN_BUILD_CUDA"))
    except BuildConfigError as e:
        sys.exit(f"error: {e}")
    if mode != "0" and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        home = find_cuda_home(os.environ)
        if home:  # torch.utils.cpp_extension reads CUDA_HOME when imported
            os.environ["CUDA_HOME"] = home
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension
    except ImportError:
        sys.exit(
            "noisynn_kernels compiles its C++ extension against the installed PyTorch, and none was found in this "
            "build environment.\nInstall torch first, then this package without build isolation:\n"
            "    pip install torch ninja\n"
            "    pip install --no-build-isolation .\n"
        )
    cuda_home = os.environ.get("CUDA_HOME") or CUDA_HOME
    try:
        build_cuda, why = decide_cuda(mode, torch.version.cuda, cuda_home,
                                      nvcc_version(cuda_home) if mode != "0" else None)
    except BuildConfigError as e:
        sys.exit(f"error: {e}")
    if build_cuda:
        # BuildExtension reads the arch list from the environment when it compiles
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(os.environ)
        print(f"noisynn_kernels: building the CPU and CUDA kernels (TORCH_CUDA_ARCH_LIST="
              f"{os.environ['TORCH_CUDA_ARCH_LIST']}; {why})", file=sys.stderr)
    else:
        print(f"noisynn_kernels: building the CPU kernels only ({why})", file=sys.stderr)
    os.chdir(HERE)  # the sources are given relative to the project root
    setup(
        ext_modules=[extension(build_cuda)],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
