"""``noisy_attention``: attention with linear transform noise on its output, as one op.

Semantics (the definition is :func:`noisynn_kernels.reference.noisy_attention`).  For ``q, k, v`` of
shape ``(B, H, N, Dh)``: ``Y = M softmax(q k^T * scale) v``, where ``M = I + Q`` mixes the query tokens
of the output (``tokens`` or ``rows`` axis: per sample, the same ``M`` for every head) or the samples
(``batch`` axis, per head and token); the first ``prefix_tokens`` tokens are never mixed.  As the
output projection acts per token, mixing here equals mixing the attention branch's output before
the residual add.  ``straight_through``: mixed forward, unmixed backward.  Autograd: ``q``, ``k``,
``v`` are differentiable; a ``dense`` matrix is a constant; no double backward.

Files of this op: :mod:`.triton` (the Triton ops ``noisynn::noisy_attention_fwd/bwd``, kernels in
``noisynn_kernels/triton/attention.py``) and this module: the reference launcher and
:data:`LAUNCHERS`, the ``{backend: launcher}`` table.  There are no compiled ``cpu`` / ``cuda``
attention kernels.  Every launcher takes ``(q, k, v, scale, spec)`` checked by
:func:`noisynn_kernels._validate.check_noisy_attention`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ... import quality, reference
from ..._validate import MixSpec

__all__ = ["LAUNCHERS", "launch_reference", "launch_triton"]


def launch_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, spec: MixSpec) -> Tensor:
    """The ``reference`` backend: ``F.scaled_dot_product_attention``, then
    :func:`noisynn_kernels.reference.linear_transform_noise` on the ``(B, N, H * Dh)`` merged heads."""
    cfg = spec.cfg
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if cfg.kind == "identity":
        return o
    B, H, N, Dh = q.shape
    M = quality.mixing_matrix("dense", spec.k, matrix=cfg.matrix) if cfg.kind == "dense" else None
    t = reference.linear_transform_noise(o.transpose(1, 2).reshape(B, N, H * Dh), cfg.kind, axis=cfg.axis,
                                         alpha=cfg.alpha, M=M, prefix_tokens=spec.prefix_tokens, grid=spec.grid,
                                         straight_through=cfg.straight_through, shift=cfg.shift)
    return t.reshape(B, N, H, Dh).transpose(1, 2)


def launch_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, spec: MixSpec) -> Tensor:
    """The ``triton`` backend (:func:`.triton.launch`); Triton is imported on first use."""
    from .triton import launch

    return launch(q, k, v, scale, spec)


#: Backend name -> launcher.
LAUNCHERS = {"reference": launch_reference, "triton": launch_triton}
