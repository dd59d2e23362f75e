"""Fused residual add + ``(I + Q)`` mix + LayerNorm in C++ on CPU: ``noisynn::mix_add_layernorm_fwd_cpu/bwd_cpu``.

The kernels and their ``TORCH_LIBRARY`` registration are in ``csrc/cpu/mix_add_layernorm.cpp`` (compiled
into ``noisynn_kernels._C``); this module registers the fake (meta) implementations and the autograd formula shared by all op
families (:mod:`noisynn_kernels.ops._fused_common`) and holds :func:`launch`.  Schema, semantics and codes are those of the Triton ops in
:mod:`noisynn_kernels.ops.mix_add_layernorm` (oracle: :func:`noisynn_kernels.reference.mix_add_layernorm`):
``s = x + residual``; by default ``residual_out = M s``, ``normed = LN(residual_out)``; with
``mix_after_norm`` ``residual_out = s``, ``normed = M LN(s)``.  Prefix tokens are never mixed.

The C++ op declares this module as its Python home (``m.set_python_module``), so torch imports it
when a fake implementation is needed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._ext import extension, extension_error
from ..errors import BackendUnavailableError, ShapeError
from ..functional import MixSpec
from ._fused_common import AXIS_CODES, KIND_CODES, bwd_fake, fwd_fake, make_backward, run_fwd, setup_context

__all__ = ["launch", "available", "KIND_CODES", "AXIS_CODES"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FWD = "noisynn::mix_add_layernorm_fwd_cpu"
_BWD = "noisynn::mix_add_layernorm_bwd_cpu"


def available() -> bool:
    """Whether the compiled extension carries the C++ ops."""
    return extension() is not None and hasattr(torch.ops.noisynn, "mix_add_layernorm_fwd_cpu")


if available():
    # here, not in a shared helper: torch checks that fakes are registered from the op's python module
    torch.library.register_fake(_FWD)(fwd_fake)
    torch.library.register_fake(_BWD)(bwd_fake)
    torch.library.register_autograd(_FWD, make_backward(torch.ops.noisynn.mix_add_layernorm_bwd_cpu),
                                    setup_context=setup_context)


def launch(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
           spec: MixSpec, mix_after_norm: bool) -> Tuple[Tensor, Tensor]:
    """Run the C++ op on arguments already validated by
    :func:`noisynn_kernels.functional.check_mix_add_layernorm`; adds the CPU-specific checks.
    Returns ``(normed, residual_out)``."""
    if not available():
        raise BackendUnavailableError(
            "the cpu mix_add_layernorm needs the compiled extension noisynn_kernels._C with the op "
            f"noisynn::mix_add_layernorm_fwd_cpu; {extension_error() or 'the extension was built without it'}")
    if x.device.type != "cpu":
        raise BackendUnavailableError(f"the cpu mix_add_layernorm needs CPU tensors, got x on {x.device}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ShapeError(f"x has dtype {x.dtype}; expected one of {_SUPPORTED_DTYPES}")
    return run_fwd(torch.ops.noisynn.mix_add_layernorm_fwd_cpu, x, residual, weight, bias, eps, spec, mix_after_norm)
