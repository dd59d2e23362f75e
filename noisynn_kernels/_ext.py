"""Loads the compiled extension (``noisynn_kernels._C``) and reports what is available and why not.

The extension is optional at import time so a source checkout still imports; whatever is missing
is reported by :func:`backend_info`, and asking for a backend that is not there raises
:class:`~noisynn_kernels.BackendUnavailableError` instead of falling back silently.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Dict, Optional

from .errors import BackendUnavailableError

__all__ = ["extension", "extension_error", "backend_info", "BACKENDS", "requested_backend"]

#: Every backend name the package knows.  Which ones exist in this installation: backend_info().
BACKENDS = ("reference", "cpu", "cuda", "triton")

_ext = None
_ext_error: Optional[str] = None


def _load():
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return
    try:
        _ext = importlib.import_module("noisynn_kernels._C")
    except ImportError as e:  # not built (source checkout) or built against another torch
        _ext_error = f"{type(e).__name__}: {e}"


def extension():
    """The compiled extension module, or ``None`` when it is not importable (see :func:`extension_error`)."""
    _load()
    return _ext


def extension_error() -> Optional[str]:
    """Why the compiled extension could not be imported, or ``None`` when it was."""
    _load()
    return _ext_error


def requested_backend() -> Optional[str]:
    """The backend named by the ``NOISYNN_BACKEND`` environment variable, validated; ``None`` if unset."""
    name = os.environ.get("NOISYNN_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise BackendUnavailableError(f"NOISYNN_BACKEND={name!r} is not a backend; expected 'auto' or one of {BACKENDS}")
    return name


def _triton_status() -> Dict[str, Any]:
    try:
        import triton
    except ImportError as e:
        return {"available": False, "why": f"triton is not installed ({e})"}
    return {"available": True, "version": triton.__version__,
            "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1"}


def backend_info() -> Dict[str, Any]:
    """What this installation has: the compiled extension and its build, Triton, CUDA, and which
    backend each device would use.  Fused-kernel backends join this report as they are added;
    until then every op runs the ``reference`` (pure PyTorch) implementation."""
    import torch

    ext = extension()
    info: Dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "extension": {"built": ext is not None},
        "triton": _triton_status(),
        "requested": requested_backend(),
        "backends": {"reference": {"available": True}},
        "chosen": {"cpu": "reference", "cuda": "reference"},
    }
    if ext is None:
        info["extension"]["why"] = extension_error()
    else:
        info["extension"].update(ext.build_info())
    return info
