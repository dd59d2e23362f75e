"""The C++ op: ``noisynn::mix_add_layernorm_fwd_cpp`` / ``noisynn::mix_add_layernorm_bwd_cpp``.

One schema (declared in ``csrc/ops.cpp``) with two implementations registered by dispatch key: the
C++ CPU kernels (``csrc/cpu/``) and, in builds with CUDA, the CUDA C++ kernels (``csrc/cuda/``), all
compiled into ``noisynn_kernels._C``, with one autograd formula in C++ (``csrc/autograd.cpp``: the
semantics of :mod:`.common`'s formula, without the Python autograd kernel's ~90 us a call).  This
module registers the op's one fake (meta) implementation (the C++ library names this module as the
op's Python home, so torch imports it when it needs the fake) and holds the ``cpu`` and ``cuda``
launchers.
The tensors' device picks the implementation; each launcher checks that the device is its own, so
the backend a caller chose is the code that runs.

CUDA: ``dweight`` / ``dbias`` are reduced from fp32 per-block partials in a fixed order
(deterministic on a given GPU).  This module imports on machines without CUDA and with an
extension built without it: ``available('cuda')`` is then ``False``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._ext import backend_status
from ..._validate import MixSpec
from ...errors import BackendUnavailableError, ShapeError
from ..common import mix_args
from .common import bwd_fake, fwd_fake, run_fwd

__all__ = ["available", "launch_cpu", "launch_cuda", "direct_call", "SUPPORTED_DTYPES"]

#: Activation dtypes the C++ kernels take.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FWD = "noisynn::mix_add_layernorm_fwd_cpp"
_BWD = "noisynn::mix_add_layernorm_bwd_cpp"


def _registered() -> bool:
    return hasattr(torch.ops.noisynn, "mix_add_layernorm_fwd_cpp")


def available(device_type: str) -> bool:
    """Whether the compiled extension carries this op's implementation for ``device_type``
    (``cpu`` or ``cuda``; a GPU is not needed for the CUDA one to be registered).  Reads the build
    description cached by :mod:`noisynn_kernels._ext`, so it is cheap and traceable by torch.compile."""
    return backend_status(device_type, device_type) is None and _registered()


if _registered():
    # here, in the op's Python home: torch checks that fakes are registered from that module
    torch.library.register_fake(_FWD)(fwd_fake)
    torch.library.register_fake(_BWD)(bwd_fake)


def _launch(device_type: str, x: Tensor, residual: Tensor | None, weight: Tensor | None,
            bias: Tensor | None, eps: float, spec: MixSpec, mix_after_norm: bool) -> tuple[Tensor, Tensor]:
    if not available(device_type):
        raise BackendUnavailableError(
            f"the {device_type} mix_add_layernorm needs the compiled extension noisynn_kernels._C with the "
            f"{device_type.upper()} implementation of {_FWD}: "
            f"{backend_status(device_type, device_type) or 'the op is not registered'}")
    if x.device.type != device_type:
        raise BackendUnavailableError(f"the {device_type} mix_add_layernorm needs {device_type.upper()} tensors, "
                                      f"got x on {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ShapeError(f"x has dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")
    return run_fwd(torch.ops.noisynn.mix_add_layernorm_fwd_cpp, x, residual, weight, bias, eps, spec, mix_after_norm)


def launch_cpu(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
               spec: MixSpec, mix_after_norm: bool) -> tuple[Tensor, Tensor]:
    """The ``cpu`` backend: the C++ CPU kernels on checked arguments; ``(normed, residual_out)``."""
    return _launch("cpu", x, residual, weight, bias, eps, spec, mix_after_norm)


def launch_cuda(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
                spec: MixSpec, mix_after_norm: bool) -> tuple[Tensor, Tensor]:
    """The ``cuda`` backend: the CUDA C++ kernels on checked arguments; ``(normed, residual_out)``."""
    return _launch("cuda", x, residual, weight, bias, eps, spec, mix_after_norm)


def direct_call(x: Tensor, eps: float, spec: MixSpec, mix_after_norm: bool):
    """The forward op and its trailing schema arguments for a call that :func:`launch_cpu` /
    :func:`launch_cuda` has just run with these arguments: ``(op, tail)`` such that
    ``op(x, residual, weight, bias, *tail)[:2]`` is that launcher's result for any tensors of the same
    shapes, dtypes and device, so that a caller that keys its cache on those (the public
    ``mix_add_layernorm``) can skip the launcher's per-call work.  ``None`` for ``dense``: its matrix is
    looked up on every call (``Q`` may have been written in place, or made to require grad)."""
    if spec.cfg.kind == "dense":
        return None
    return (torch.ops.noisynn.mix_add_layernorm_fwd_cpp.default,
            (float(eps), *mix_args(spec, x.device), mix_after_norm, bool(spec.cfg.straight_through)))
