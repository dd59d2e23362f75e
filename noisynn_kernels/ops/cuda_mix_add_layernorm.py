"""Fused residual add + ``(I + Q)`` mix + LayerNorm in CUDA C++: ``noisynn::mix_add_layernorm_fwd_cuda/bwd_cuda``.

The kernels and their ``TORCH_LIBRARY`` registration are in ``csrc/cuda/`` (compiled into
``noisynn_kernels._C`` when the package is built with CUDA, see ``NOISYNN_BUILD_CUDA`` in ``setup.py``);
this module adds what lives in Python: the fake (meta) implementations, the autograd formula and
:func:`launch`.  Schema, semantics and codes are those of the C++ CPU ops in
:mod:`noisynn_kernels.ops.cpu_mix_add_layernorm` and the Triton ops in
:mod:`noisynn_kernels.ops.mix_add_layernorm` (oracle: :func:`noisynn_kernels.reference.mix_add_layernorm`):
``s = x + residual``; by default ``residual_out = M s``, ``normed = LN(residual_out)``; with
``mix_after_norm`` ``residual_out = s``, ``normed = M LN(s)``.  Prefix tokens are never mixed.

Each compiled op has one device: ``*_cpu`` ops take CPU tensors, ``*_cuda`` ops CUDA tensors, so the
backend a caller chose (``cpu``, ``cuda`` or ``triton``) is the code that runs.

Autograd: ``x``, ``residual``, ``weight`` and ``bias`` are differentiable; the ``dense`` matrix is a
constant; no double backward.  ``straight_through`` runs the mixed forward and an identity backward.
``dweight`` / ``dbias`` are reduced from fp32 per-block partials in a fixed order (deterministic on a
given GPU).  This module imports on machines without CUDA and with an extension built without it:
:func:`available` is then ``False`` and nothing is registered.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import quality
from .._ext import backend_status
from ..errors import BackendUnavailableError, ConfigError, ShapeError
from ..functional import MixSpec

__all__ = ["launch", "available", "KIND_CODES", "AXIS_CODES"]

#: Op-schema codes (the same as the CPU and Triton ops').
KIND_CODES = {"identity": 0, "shift": 1, "optimal": 2, "dense": 3}
AXIS_CODES = {"tokens": 0, "rows": 1, "batch": 2}

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FWD = "noisynn::mix_add_layernorm_fwd_cuda"
_BWD = "noisynn::mix_add_layernorm_bwd_cuda"


def available() -> bool:
    """Whether the compiled extension carries the CUDA ops (a GPU is not needed to register them).  Reads
    the build description cached by :mod:`noisynn_kernels._ext`, so it is cheap and traceable by torch.compile."""
    return backend_status("cuda", "cuda") is None and hasattr(torch.ops.noisynn, "mix_add_layernorm_fwd_cuda")


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
    dx, dw, db = torch.ops.noisynn.mix_add_layernorm_bwd_cuda(
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
    cfg = spec.cfg
    mix_matrix = None
    if cfg.kind == "dense":
        q = cfg.matrix
        if q.requires_grad and torch.is_grad_enabled():
            raise ConfigError("the dense quality matrix requires grad, but the fused op treats it as a constant "
                              "(no gradient wrt Q); detach it, or use noisynn_kernels.reference to learn Q")
        mix_matrix = quality.mixing_matrix("dense", spec.k, matrix=q).to(device=x.device, dtype=torch.float32)
        # data-dependent (a graph break under torch.compile): checked in eager only
        if not torch.compiler.is_compiling() and not torch.isfinite(mix_matrix).all():
            raise ConfigError("dense quality matrix has non-finite entries (in fp32); expected finite values")
    grid_w = spec.grid[1] if spec.grid is not None else 1
    normed, residual_out, _, _ = torch.ops.noisynn.mix_add_layernorm_fwd_cuda(
        x, residual, weight, bias, float(eps), KIND_CODES[cfg.kind], AXIS_CODES[cfg.axis], float(cfg.alpha),
        mix_matrix, spec.prefix_tokens, grid_w, mix_after_norm, bool(cfg.straight_through))
    return normed, residual_out
