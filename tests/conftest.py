"""Test-wide set-up.

Triton kernels run on CPU only through the Triton interpreter, which has to be chosen before any
kernel is defined; on a machine with CUDA the real compiler is used.  Set TRITON_INTERPRET yourself
to override.

The ``backend`` fixture: the backend under test, on the device it runs on here, parametrized by the
test with the names of its op's backends (:func:`_backends.backends`); a backend that cannot run here
is skipped with the reason.  See tests/_backends.py.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def backend(request) -> "_backends.Backend":  # noqa: F821
    """The backend named by the test's (indirect) ``backend`` parameter, on its device here; skipped with
    the reason when it cannot run here."""
    from _backends import Backend  # imports noisynn_kernels, after TRITON_INTERPRET is set

    b = Backend.named(request.param)
    why = b.why_not()
    if why is not None:
        pytest.skip(f"backend {b.name!r} cannot run on {b.device} here: {why}")
    return b
