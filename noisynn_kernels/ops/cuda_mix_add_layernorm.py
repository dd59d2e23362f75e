"""Fused residual add + ``(I + Q)`` mix + LayerNorm in CUDA C++: ``noisynn::mix_add_layernorm_fwd_cuda/bwd_cuda``.

The kernels and their ``TORCH_LIBRARY`` registration are in ``csrc/cuda/`` (compiled into
``noisynn_kernels._C`` when the package is built with CUDA, see ``NOISYNN_BUILD_CUDA`` in ``setup.py``);
this module registers the fake (meta) implementations and the autograd formula shared by all op
families (:mod:`noisynn_kernels.ops._fused_common`) and holds :func:`launch`.  Schema, semantics and codes are those of the C++ CPU ops in
:mod:`noisynn_kernels.ops.cpu_mix_add_layernorm` and the Triton ops in
:mod:`noisynn_kernels.ops.mix_add_layernorm` (oracle: :func:`noisynn_kernels.reference.mix_add_layernorm`):
``s = x + residual``; by default ``residual_out = M s``, ``normed = LN(residual_out)``; with
``mix_after_norm`` ``residual_out = s``, ``normed = M LN(s)``.  Prefix tokens are never mixed.

Each compiled op has one device: ``*_cpu`` ops take CPU tensors, ``*_cuda`` ops CUDA tensors, so the
backend a caller chose (``cpu``, ``cuda`` or ``triton``) is the code that runs.

``dweight`` / ``dbias`` are reduced from fp32 per-block partials in a fixed order (deterministic on a
given GPU).  This module imports on machines without CUDA and with an extension built without it:
:func:`available` is then ``False`` and nothing is registered.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._ext import backend_status
from ..errors import BackendUnavailableError, ShapeError
from ..functional import MixSpec
from ._fused_common import AXIS_CODES, KIND_CODES, bwd_fake, fwd_fake, make_backward, run_fwd, setup_context

__all__ = ["launch", "available", "KIND_CODES", "AXIS_CODES"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FWD = "noisynn::mix_add_layernorm_fwd_cuda"
_BWD = "noisynn::mix_add_layernorm_bwd_cuda"


def available() -> bool:
    """Whether the compiled extension carries the CUDA ops (a GPU is not needed to register them).  Reads
    the build description cached by :mod:`noisynn_kernels._ext`, so it is cheap and traceable by torch.compile."""
    return backend_status("cuda", "cuda") is None and hasattr(torch.ops.noisynn, "mix_add_layernorm_fwd_cuda")


if available():
    # here, not in a shared helper: torch checks that fakes are registered from the op's python module
    torch.library.register_fake(_FWD)(fwd_fake)
    torch.library.register_fake(_BWD)(bwd_fake)
    torch.library.register_autograd(_FWD, make_backward(torch.ops.noisynn.mix_add_layernorm_bwd_cuda),
                                    setup_context=setup_context)


def launch(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
           spec: MixSpec, mix_after_norm: bool) -> Tuple[Tensor, Tensor]:
    """Run the CUDA op on arguments already validated by
    :func:`noisynn_kernels.functional.check_mix_add_layernorm`; adds the CUDA-specific checks.
    Returns ``(normed, residual_out)``."""
    if not available():
        raise BackendUnavailableError(
            "the cuda mix_add_layernorm needs the compiled extension noisynn_kernels._C built with its CUDA "
            f"kernels (noisynn::mix_add_layernorm_fwd_cuda): {backend_status('cuda', 'cuda') or 'the op is not registered'}")
    if x.device.type != "cuda":
        raise BackendUnavailableError(f"the cuda mix_add_layernorm needs CUDA tensors, got x on {x.device}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ShapeError(f"x has dtype {x.dtype}; expected one of {_SUPPORTED_DTYPES}")
    return run_fwd(torch.ops.noisynn.mix_add_layernorm_fwd_cuda, x, residual, weight, bias, eps, spec, mix_after_norm)
