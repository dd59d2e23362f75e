"""What every benchmark and audit result records about the run: device, versions, commit and, on CPU,
the C++ kernels' build and the allocator setting (:func:`environment`)."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import torch

__all__ = ["environment", "device_name", "malloc_setting", "MALLOC_ENV"]


def device_name(device: torch.device) -> str:
    """A human name of the device: the GPU model, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _git_commit() -> str:
    # A copy of the tree without its .git (e.g. shipped to a GPU machine) names its commit in NOISYNN_COMMIT.
    if os.environ.get("NOISYNN_COMMIT"):
        return os.environ["NOISYNN_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# Environment variables that change how the C library's allocator serves large tensors (set before the
# process starts); see malloc_setting.
MALLOC_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def malloc_setting() -> str:
    """The allocator configuration of this process as ``NAME=value`` pairs of :data:`MALLOC_ENV`, or
    ``"default"``.  On CPU it decides whether a large output is fresh memory, page-faulted on first
    write, or reused from an earlier free (benchmarks/README.md)."""
    parts = [f"{k}={os.environ[k]}" for k in MALLOC_ENV if os.environ.get(k)]
    return " ".join(parts) or "default"


def environment(device: torch.device) -> dict[str, str]:
    """Versions, device and commit recorded with every result."""
    import timm

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from .. import __version__
    from .._ext import extension

    env = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
           "triton": triton_version, "timm": timm.__version__, "noisynn_kernels": __version__,
           "python": platform.python_version(), "commit": _git_commit(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cpu":
        env["threads"] = torch.get_num_threads()
        info = extension().build_info() if extension() is not None else {}
        # which build of the C++ kernels ran, and whether their large outputs asked for huge pages
        env["cpu_isa"] = info.get("cpu_isa", "not built")
        env["cpu_hugepage_outputs"] = info.get("cpu_hugepage_outputs", False)
        env["malloc"] = malloc_setting()
    return env
