"""Fused residual add + ``(I + Q)`` mix + LayerNorm in C++ on CPU: ``noisynn::mix_add_layernorm_fwd_cpu/bwd_cpu``.

The kernels and their ``TORCH_LIBRARY`` registration are in ``csrc/cpu/mix_add_layernorm.cpp`` (compiled
into ``noisynn_kernels._C``); this module adds what lives in Python: the fake (meta) implementations,
the autograd formula and :func:`launch`.  Schema, semantics and codes are those of the Triton ops in
:mod:`noisynn_kernels.ops.mix_add_layernorm` (oracle: :func:`noisynn_kernels.reference.mix_add_layernorm`):
``s = x + residual``; by default ``residual_out = M s``, ``normed = LN(residual_out)``; with
``mix_after_norm`` ``residual_out = s``, ``normed = M LN(s)``.  Prefix tokens are never mixed.

Autograd: ``x``, ``residual``, ``weight`` and ``bias`` are differentiable; the ``dense`` matrix is a
constant; no double backward.  ``straight_through`` runs the mixed forward and an identity backward.
The C++ op declares this module as its Python home (``m.set_python_module``), so torch imports it
when a fake implementation is needed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import quality
from .._ext import extension, extension_error
from ..errors import BackendUnavailableError, ConfigError, ShapeError
from ..functional import MixSpec

__all__ = ["launch", "available", "KIND_CODES", "AXIS_CODES"]

#: Op-schema codes (the same as the Triton ops').
KIND_CODES = {"identity": 0, "shift": 1, "optimal": 2, "dense": 3}
AXIS_CODES = {"tokens": 0, "rows": 1, "batch": 2}

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FWD = "noisynn::mix_add_layernorm_fwd_cpu"
_BWD = "noisynn::mix_add_layernorm_bwd_cpu"


def available() -> bool:
    """Whether the compiled extension carries the C++ ops."""
    return extension() is not None and hasattr(torch.ops.noisynn, "mix_add_layernorm_fwd_cpu")


def _fwd_fake(x, residual, weight, bias, eps, kind, axis, alpha, mix_matrix, prefix_tokens, grid_w, mix_after_norm,
              straight_through):
    B, N, D = x.shape
    return (x.new_empty((B, N, D)), x.new_empty((B, N, D)),
            x.new_empty((B * N,), dtype=torch.float32), x.new_empty((B * N,), dtype=torch.float32))


def _bwd_fake(d_normed, d_residual_out, residual_out, weight, mean, rstd, kind, axis, alpha, mix_matrix,
              prefix_tokens, grid_w, mix_after_norm):
    D = residual_out.shape[-1]
    return (residual_out.new_empty(residual_out.shape), residual_out.new_empty((D,), dtype=torch.float32),
            residual_out.new_empty((D,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    (x, residual, weight, bias, eps, kind, axis, alpha, mix_matrix, prefix_tokens, grid_w, mix_after_norm,
     straight_through) = inputs
    _, residual_out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(residual_out, weight, mean, rstd, mix_matrix)
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.kind = KIND_CODES["identity"] if straight_through else kind  # forward M x, gradient the identity
    ctx.axis, ctx.alpha, ctx.prefix_tokens, ctx.grid_w = axis, alpha, prefix_tokens, grid_w
    ctx.mix_after_norm = mix_after_norm


def _backward(ctx, d_normed, d_residual_out, _d_mean, _d_rstd):
    residual_out, weight, mean, rstd, mix_matrix = ctx.saved_tensors
    if d_normed is None:
        d_normed = torch.zeros_like(residual_out)
    dx, dw, db = torch.ops.noisynn.mix_add_layernorm_bwd_cpu(
        d_normed, d_residual_out, residual_out, weight, mean, rstd, ctx.kind, ctx.axis, ctx.alpha, mix_matrix,
        ctx.prefix_tokens, ctx.grid_w, ctx.mix_after_norm)
    need = ctx.needs_input_grad
    d_x = dx if need[0] else None
    d_res = None
    if ctx.has_residual and need[1]:
        d_res = dx.clone() if d_x is not None else dx  # x and residual get separate gradient tensors
    d_w = dw.to(weight.dtype) if weight is not None and need[2] else None
    d_b = db.to(residual_out.dtype if weight is None else weight.dtype) if ctx.has_bias and need[3] else None
    return d_x, d_res, d_w, d_b, None, None, None, None, None, None, None, None, None


if available():
    torch.library.register_fake(_FWD)(_fwd_fake)
    torch.library.register_fake(_BWD)(_bwd_fake)
    torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


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
    cfg = spec.cfg
    mix_matrix = None
    if cfg.kind == "dense":
        q = cfg.matrix
        if q.requires_grad and torch.is_grad_enabled():
            raise ConfigError("the dense quality matrix requires grad, but the fused op treats it as a constant "
                              "(no gradient wrt Q); detach it, or use noisynn_kernels.reference to learn Q")
        mix_matrix = quality.mixing_matrix("dense", spec.k, matrix=q).to(device=x.device, dtype=torch.float32)
        if not torch.compiler.is_compiling() and not torch.isfinite(mix_matrix).all():
            raise ConfigError("dense quality matrix has non-finite entries (in fp32); expected finite values")
    grid_w = spec.grid[1] if spec.grid is not None else 1
    normed, residual_out, _, _ = torch.ops.noisynn.mix_add_layernorm_fwd_cpu(
        x, residual, weight, bias, float(eps), KIND_CODES[cfg.kind], AXIS_CODES[cfg.axis], float(cfg.alpha),
        mix_matrix, spec.prefix_tokens, grid_w, mix_after_norm, bool(cfg.straight_through))
    return normed, residual_out
