"""What the two ``mix_add_layernorm`` op families (the Triton ops and the C++ op with its CPU and CUDA
implementations) share: one schema, so one fake (meta) implementation per entry point, the autograd
formula (:func:`make_backward`, around the Triton backward op; the C++ op has the same formula in C++,
``csrc/autograd.cpp``, where it costs a few microseconds a call instead of a Python kernel's ~90) and
one way to call the forward op from a checked :class:`~noisynn_kernels._validate.MixSpec`
(:func:`run_fwd`).  Nothing here imports Triton or needs the compiled extension.

Autograd: ``x``, ``residual``, ``weight`` and ``bias`` are differentiable; the ``dense`` matrix is a
constant; no double backward.  ``straight_through`` runs the mixed forward and an identity backward.
Gradients are not materialized: when ``residual_out`` gets no gradient (the usual case when only
``normed`` is used), the backward op receives ``None`` instead of a tensor of zeros.  ``x`` and
``residual`` receive the same gradient tensor, as autograd's own ``x + residual`` does (autograd never
writes into a gradient it was handed; it copies where it must accumulate).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..._op_codes import KIND_CODES
from ..._validate import MixSpec
from ..common import mix_args

__all__ = ["fwd_fake", "bwd_fake", "setup_context", "make_backward", "run_fwd"]


def fwd_fake(x, residual, weight, bias, eps, kind, axis, alpha, shift, mix_matrix, prefix_tokens, grid_w,
             mix_after_norm, straight_through):
    """Fake of every ``mix_add_layernorm_fwd*`` op: ``(normed, residual_out, mean, rstd)``."""
    B, N, D = x.shape
    return (x.new_empty((B, N, D)), x.new_empty((B, N, D)),
            x.new_empty((B * N,), dtype=torch.float32), x.new_empty((B * N,), dtype=torch.float32))


def bwd_fake(d_normed, d_residual_out, residual_out, weight, mean, rstd, kind, axis, alpha, shift, mix_matrix,
             prefix_tokens, grid_w, mix_after_norm):
    """Fake of every ``mix_add_layernorm_bwd*`` op: ``(dx, dweight, dbias)``, the last two fp32 ``(D,)``."""
    D = residual_out.shape[-1]
    return (residual_out.new_empty(residual_out.shape), residual_out.new_empty((D,), dtype=torch.float32),
            residual_out.new_empty((D,), dtype=torch.float32))


def setup_context(ctx, inputs, output):
    """``setup_context`` of every ``mix_add_layernorm_fwd*`` op's autograd formula."""
    (x, residual, weight, bias, eps, kind, axis, alpha, shift, mix_matrix, prefix_tokens, grid_w, mix_after_norm,
     straight_through) = inputs
    _, residual_out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused residual_out costs no zero-filled gradient
    ctx.save_for_backward(residual_out, weight, mean, rstd, mix_matrix)
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype  # dbias in bias's own dtype (weight's may differ)
    ctx.kind = KIND_CODES["identity"] if straight_through else kind  # forward M x, gradient the identity
    ctx.axis, ctx.alpha, ctx.shift, ctx.prefix_tokens, ctx.grid_w = axis, alpha, shift, prefix_tokens, grid_w
    ctx.mix_after_norm = mix_after_norm


def make_backward(bwd_op: Callable) -> Callable:
    """The autograd ``backward`` around ``bwd_op`` (a ``mix_add_layernorm_bwd*`` op)."""

    def backward(ctx, d_normed, d_residual_out, _d_mean, _d_rstd):
        need = ctx.needs_input_grad
        if d_normed is None and d_residual_out is None:
            return (None,) * 14
        residual_out, weight, mean, rstd, mix_matrix = ctx.saved_tensors
        if d_normed is None:
            d_normed = torch.zeros_like(residual_out)
        dx, dw, db = bwd_op(d_normed, d_residual_out, residual_out, weight, mean, rstd, ctx.kind, ctx.axis,
                            ctx.alpha, ctx.shift, mix_matrix, ctx.prefix_tokens, ctx.grid_w, ctx.mix_after_norm)
        d_x = dx if need[0] else None
        d_res = dx if ctx.has_residual and need[1] else None
        d_w = dw.to(weight.dtype) if weight is not None and need[2] else None
        d_b = db.to(ctx.bias_dtype) if ctx.has_bias and need[3] else None
        return (d_x, d_res, d_w, d_b) + (None,) * 10

    return backward


def run_fwd(fwd_op: Callable, x: Tensor, residual: Tensor | None, weight: Tensor | None,
            bias: Tensor | None, eps: float, spec: MixSpec, mix_after_norm: bool):
    """Call a ``mix_add_layernorm_fwd*`` op with the schema arguments of a checked ``spec``:
    ``(normed, residual_out)``."""
    normed, residual_out, _, _ = fwd_op(x, residual, weight, bias, float(eps), *mix_args(spec, x.device),
                                        mix_after_norm, bool(spec.cfg.straight_through))
    return normed, residual_out
