"""Loads the compiled extension (``noisynn_kernels._C``) and reports what is available and why not.

The extension is optional at import time so a source checkout still imports; whatever is missing
is reported by :func:`backend_info`, and asking for a backend that is not there raises
:class:`~noisynn_kernels.BackendUnavailableError` instead of falling back silently.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

from .errors import BackendUnavailableError

__all__ = ["extension", "extension_error", "backend_info", "BACKENDS", "requested_backend", "requested_backend_token",
           "select_backend", "backend_status", "triton_interpreted", "cuda_kernel_image"]

#: Every backend name the package knows.  Which ones exist in this installation: backend_info().
BACKENDS = ("reference", "cpu", "cuda", "triton")
# The automatic choice per device, in order of preference (reference when none is available).
_DEFAULTS = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}

_ext = None
_ext_error: str | None = None
# The extension's build_info(), read once: backend checks run inside torch.compile'd code, where a
# call into the pybind11 module would break the graph but a dict lookup does not.
_build_info: dict[str, Any] = {}


def _load():
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return
    try:
        _ext = importlib.import_module("noisynn_kernels._C")
        _build_info.update(_ext.build_info())
    except ImportError as e:  # not built (source checkout) or built against another torch
        _ext_error = f"{type(e).__name__}: {e}"


def extension():
    """The compiled extension module, or ``None`` when it is not importable (see :func:`extension_error`)."""
    _load()
    return _ext


def extension_error() -> str | None:
    """Why the compiled extension could not be imported, or ``None`` when it was."""
    _load()
    return _ext_error


def requested_backend() -> str | None:
    """The backend named by the ``NOISYNN_BACKEND`` environment variable, validated; ``None`` if unset."""
    name = os.environ.get("NOISYNN_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise BackendUnavailableError(
            f"NOISYNN_BACKEND={name!r} is not a backend; expected 'auto' or one of {BACKENDS}")
    return name


# os.environ's own store (CPython keeps the encoded environment in _data): a lookup there costs a dict get,
# where os.environ.get of an unset name raises and catches a KeyError (several microseconds a call).
_ENV_STORE = getattr(os.environ, "_data", None)
_ENV_NAME = os.environ.encodekey("NOISYNN_BACKEND") if _ENV_STORE is not None else None


def requested_backend_token():
    """``NOISYNN_BACKEND`` as the environment holds it (encoded, unvalidated; ``None`` if unset): cheap
    enough to read on every call, for keying caches of backend choices.  The value itself is
    :func:`requested_backend`'s."""
    if _ENV_STORE is not None:
        return _ENV_STORE.get(_ENV_NAME)
    return os.environ.get("NOISYNN_BACKEND")


# One @triton.jit kernel of each kernel module: its type says whether Triton's interpreter wrapped it.
_KERNEL_PROBES = (("noisynn_kernels.triton.mix_layernorm", "mix_add_layernorm_fwd_kernel"),
                  ("noisynn_kernels.triton.attention", "attn_fwd_kernel"),
                  ("noisynn_kernels.triton.random_noise", "gaussian_noise_kernel"))


def triton_interpreted() -> bool:
    """Whether this process's Triton kernels run in Triton's CPU interpreter.  Triton decides when a
    kernel is defined, so once the package's kernel modules are imported their choice is final and
    a later change of ``TRITON_INTERPRET`` does not count."""
    import sys

    for name, kernel in _KERNEL_PROBES:
        mod = sys.modules.get(name)
        if mod is not None:
            return type(getattr(mod, kernel)).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> dict[str, Any]:
    try:
        import triton
    except ImportError as e:
        return {"available": False, "why": f"triton is not installed ({e})"}
    return {"available": True, "version": triton.__version__, "interpreter": triton_interpreted()}


_cuda_image: dict[str, Any] = {}


def cuda_kernel_image() -> dict[str, Any] | None:
    """Whether the compiled CUDA kernels can run on the current GPU (``loadable``, the ``binary_version``
    and ``ptx_version`` of the image loaded, or the CUDA ``error``, and the GPU's
    ``device_capability``); ``None`` without CUDA kernels or a GPU.  Asked once per process (it
    creates the CUDA context) and never first inside a ``torch.compile``'d region, where the kernels
    are taken as loadable."""
    _load()
    if not _cuda_image:
        if _ext is None or not hasattr(_ext, "cuda_kernel_image"):
            return None
        import torch

        if torch.compiler.is_compiling() or not torch.cuda.is_available():
            return None
        image = dict(_ext.cuda_kernel_image())
        major, minor = torch.cuda.get_device_capability()
        image["device_capability"] = f"{major}.{minor}"
        _cuda_image.update(image)
    return _cuda_image


def backend_status(name: str, device_type: str) -> str | None:
    """``None`` when backend ``name`` can run ops on ``device_type`` here, else the reason it cannot."""
    if name == "reference":
        return None
    if name == "triton":
        t = _triton_status()
        if not t["available"]:
            return t["why"]
        if device_type == "cuda":
            return None
        if device_type == "cpu" and t["interpreter"]:
            return None
        return (f"Triton kernels run CUDA tensors, and CPU tensors only under the Triton interpreter "
                f"(TRITON_INTERPRET=1 set before triton is imported); got a {device_type} tensor")
    if name in ("cpu", "cuda"):
        if device_type != name:
            return f"the {name} backend runs {name.upper()} tensors only"
        ext = extension()
        if ext is None:
            return f"the compiled extension is not importable ({extension_error()})"
        built = _build_info.get(f"{name}_kernels", [])
        if "mix_add_layernorm" not in built:
            how = ("it was built without CUDA (NOISYNN_BUILD_CUDA=0, or no nvcc / CUDA torch at build time)"
                   if name == "cuda" else "it was built without them")
            return f"the compiled extension has no {name} kernels: {how}"
        if name == "cuda":
            image = cuda_kernel_image()
            if image is not None and not image["loadable"]:
                cap = image["device_capability"]
                return (f"the CUDA kernels were compiled for {_build_info.get('cuda_arch_list')} with no code this "
                        f"GPU (compute capability {cap}) can run ({image['error']}); rebuild with "
                        f"TORCH_CUDA_ARCH_LIST={cap} (or a list with +PTX of an older architecture)")
        return None
    raise BackendUnavailableError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def select_backend(device_type: str, requested: str | None = None, *, supported: Sequence[str] = BACKENDS,
                   op: str = "fused ops") -> str:
    """The backend that runs ``op`` on ``device_type``, among the backends it has (``supported``).

    - An argument ``requested`` (anything but ``None`` / ``''`` / ``'auto'``) must be a backend the op
      has and that can run there; else :class:`~noisynn_kernels.BackendUnavailableError` says why.
    - Else ``NOISYNN_BACKEND``, a process-wide preference: used by the ops that have that backend
      (and then it must be able to run there, else the error), ignored by the ops that have not
      (e.g. ``NOISYNN_BACKEND=cpu`` for an op with no compiled kernels).
    - Else the device's default: on CUDA ``triton`` (else the compiled ``cuda`` kernels), on CPU the
      compiled ``cpu`` kernels, and ``reference`` where none of those is available (the Triton
      interpreter is for tests, never chosen automatically).

    Never falls back silently from a backend that was asked for."""
    name = requested.strip().lower() if isinstance(requested, str) else requested
    explicit = name not in (None, "", "auto")
    if not explicit:
        name = requested_backend()
    if name is not None:
        if name not in BACKENDS:
            raise BackendUnavailableError(f"backend {name!r} is not a backend; expected 'auto' or one of {BACKENDS}")
        if name not in supported:
            if explicit:
                raise BackendUnavailableError(
                    f"backend {name!r} has no {op} kernels; expected one of {tuple(supported)}, 'auto' or None")
            name = None  # the environment's preference does not apply to this op
    if name is None:
        for candidate in _DEFAULTS.get(device_type, ()):
            if candidate in supported and backend_status(candidate, device_type) is None:
                return candidate
        return "reference"
    why = backend_status(name, device_type)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device_type}: {why}")
    return name


def backend_info() -> dict[str, Any]:
    """What this installation has: the compiled extension and its build, Triton, CUDA, each
    backend's availability per device (with the reason where it is missing), and which backend each
    device uses by default."""
    import torch

    ext = extension()
    backends = {}
    for name in BACKENDS:
        per_device = {}
        for dev in ("cpu", "cuda"):
            why = backend_status(name, dev)
            per_device[dev] = True if why is None else why
        backends[name] = per_device
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "extension": {"built": ext is not None},
        "triton": _triton_status(),
        "requested": requested_backend(),
        "backends": backends,
        "chosen": {dev: select_backend(dev) for dev in ("cpu", "cuda")},
    }
    if ext is None:
        info["extension"]["why"] = extension_error()
    else:
        info["extension"].update(_build_info)
        image = cuda_kernel_image()
        if image is not None:
            info["extension"]["cuda_device"] = dict(image)
    return info


# Load at import, never first inside a torch.compile'd region (Dynamo cannot trace an import).
_load()
