"""The backends under test, for the ``backend`` fixture of conftest.py.

A test of an op takes the ``backend`` fixture and is parametrized with the names of the op's backends
through :func:`backends` (or :func:`backend_param` for cases that differ per backend); it gets a
:class:`Backend`, the name with the device it runs on here: ``reference`` and ``cpu`` on the CPU,
``cuda`` on the GPU, ``triton`` on the GPU when there is one, else on the CPU under Triton's
interpreter.  A backend that cannot run here is skipped with the reason
(:func:`noisynn_kernels._ext.backend_status`, or "no CUDA device"); the cases of a backend that runs on
the GPU are marked ``gpu``.
"""

from typing import NamedTuple, Optional

import pytest
import torch

from noisynn_kernels._ext import backend_status

__all__ = ["DEVICES", "Backend", "backends", "backend_param"]

#: The device each backend's tests run on, here.
DEVICES = {"reference": "cpu", "cpu": "cpu", "cuda": "cuda", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


class Backend(NamedTuple):
    """A backend under test: its name and the device (``cpu`` / ``cuda``) its tensors live on."""

    name: str
    device: str

    @classmethod
    def named(cls, name: str) -> "Backend":
        return cls(name, DEVICES[name])

    @property
    def interpreted(self) -> bool:
        """Triton kernels running on the CPU in Triton's interpreter."""
        return self.name == "triton" and self.device == "cpu"

    def why_not(self) -> Optional[str]:
        """``None`` when this backend can run on its device here, else the reason."""
        why = backend_status(self.name, self.device)
        if why is None and self.device == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device"
        return why

    def skip_unless(self, dtype: torch.dtype) -> None:
        """Skip where this backend has no ``dtype`` (Triton's interpreter has no bfloat16)."""
        if self.interpreted and dtype == torch.bfloat16:
            pytest.skip("Triton's interpreter (TRITON_INTERPRET=1) has no bfloat16; this runs with the compiled "
                        "Triton kernels on a GPU")

    def skip_if_interpreted(self, why: str) -> None:
        """Skip under Triton's interpreter, saying ``why``."""
        if self.interpreted:
            pytest.skip(f"not under Triton's interpreter (TRITON_INTERPRET=1): {why}")


def _marks(name: str):
    return (pytest.mark.gpu,) if DEVICES[name] == "cuda" else ()


def backend_param(name: str, *values, id: Optional[str] = None, marks=()):
    """One ``pytest.param`` of ``(backend, *values)``, for ``parametrize("backend,...", ..., indirect=["backend"])``
    (``id``: of the values)."""
    return pytest.param(name, *values, id=name if id is None else f"{name}-{id}", marks=_marks(name) + tuple(marks))


def backends(*names: str):
    """Parametrize the test's ``backend`` fixture with ``names``."""
    return pytest.mark.parametrize("backend", [backend_param(n) for n in names], indirect=True)
