"""``mix_add_layernorm``: residual add + ``(I + Q)`` mix + LayerNorm as one op.

Semantics (the definition is :func:`noisynn_kernels.reference.mix_add_layernorm`; every backend is
tested against it).  For ``(B, N, D)`` tokens ``x`` and ``residual`` (or no residual):

- ``s = x + residual`` (or ``x``);
- by default ``residual_out = M s`` and ``normed = LN(residual_out)`` (noise in the residual stream
  entering a block); with ``mix_after_norm`` ``residual_out = s`` and ``normed = M LN(s)`` (the
  official ViT position, the LayerNorm-1 output);
- ``M = I + Q`` (kinds ``identity``, ``shift``, ``optimal``, ``dense``) mixes the ``tokens``, the
  ``rows`` of the ``(gh, gw)`` patch grid, or the ``batch``; the first ``prefix_tokens`` tokens are
  added and normalized but never mixed;
- ``straight_through``: the forward value is mixed, the gradient passes the mix as the identity;
- autograd: ``x``, ``residual``, ``weight``, ``bias`` are differentiable; a ``dense`` matrix is a
  constant; no double backward (the C++ op's gradients from a ``create_graph=True`` backward raise
  when differentiated);
- dtypes: ``normed`` and ``residual_out`` have ``x``'s dtype whatever the dtypes of ``weight`` and
  ``bias``; the fused kernels compute in fp32.

Files of this op:

- :mod:`.common`: the fakes, the autograd formula and the call from a checked spec, shared by
  both op families;
- :mod:`.triton`: the Triton ops ``noisynn::mix_add_layernorm_fwd/bwd`` (kernels in
  ``noisynn_kernels/triton/mix_layernorm.py``);
- :mod:`.cpp`: the C++ op ``noisynn::mix_add_layernorm_fwd_cpp/bwd_cpp``, one schema with a CPU and a
  CUDA implementation (``csrc/``);
- this module: the reference launcher and :data:`LAUNCHERS`, the ``{backend: launcher}`` table that
  :func:`noisynn_kernels.mix_add_layernorm` and the model integration dispatch through.

Every launcher takes ``(x, residual, weight, bias, eps, spec, mix_after_norm)`` with arguments
already checked by :func:`noisynn_kernels._validate.check_mix_add_layernorm` and returns
``(normed, residual_out)``.
"""

from __future__ import annotations

from torch import Tensor

from ... import quality, reference
from ..._validate import MixSpec
from ..common import autocast_off

__all__ = ["LAUNCHERS", "direct_call", "launch_reference", "launch_triton", "launch_cpu", "launch_cuda"]


def launch_reference(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                     eps: float, spec: MixSpec, mix_after_norm: bool) -> tuple[Tensor, Tensor]:
    """The ``reference`` backend: :func:`noisynn_kernels.reference.mix_add_layernorm` (PyTorch ops) on
    checked arguments, autocast off so outputs keep ``x``'s dtype as on the fused backends."""
    cfg = spec.cfg
    M = quality.mixing_matrix("dense", spec.k, matrix=cfg.matrix) if cfg.kind == "dense" else None
    with autocast_off(x):
        return reference.mix_add_layernorm(x, residual, weight, bias, eps, kind=cfg.kind, axis=cfg.axis,
                                           alpha=cfg.alpha, M=M, prefix_tokens=spec.prefix_tokens, grid=spec.grid,
                                           mix_after_norm=mix_after_norm, straight_through=cfg.straight_through,
                                           shift=cfg.shift)


#: Backend modules imported so far (see :func:`_backend`).
_IMPORTED: dict = {}


def _backend(name: str):
    """Backend module ``name`` (``triton`` or ``cpp``), imported on first use and then kept: importing
    it costs Triton, or the C++ op's registrations (about 0.1 s); a ``from .x import y`` in every call
    would still cost about 10 us per call.  The literal imports keep it traceable by torch.compile."""
    mod = _IMPORTED.get(name)
    if mod is None:
        if name == "triton":
            from . import triton as mod
        else:
            from . import cpp as mod
        _IMPORTED[name] = mod
    return mod


def launch_triton(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                  eps: float, spec: MixSpec, mix_after_norm: bool) -> tuple[Tensor, Tensor]:
    """The ``triton`` backend (:func:`.triton.launch`); Triton is imported on first use, so that
    ``TRITON_INTERPRET`` can still be chosen before then."""
    return _backend("triton").launch(x, residual, weight, bias, eps, spec, mix_after_norm)


def launch_cpu(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
               spec: MixSpec, mix_after_norm: bool) -> tuple[Tensor, Tensor]:
    """The ``cpu`` backend (:func:`.cpp.launch_cpu`); the C++ op's fake and autograd are registered on
    first use (about 0.1 s, kept out of ``import noisynn_kernels``)."""
    return _backend("cpp").launch_cpu(x, residual, weight, bias, eps, spec, mix_after_norm)


def launch_cuda(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
                spec: MixSpec, mix_after_norm: bool) -> tuple[Tensor, Tensor]:
    """The ``cuda`` backend (:func:`.cpp.launch_cuda`), imported on first use as the ``cpu`` one."""
    return _backend("cpp").launch_cuda(x, residual, weight, bias, eps, spec, mix_after_norm)


def direct_call(name: str, x: Tensor, eps: float, spec: MixSpec, mix_after_norm: bool):
    """After ``LAUNCHERS[name]`` ran a call with these arguments: for the C++ backends (``cpu``,
    ``cuda``) the forward op and its trailing arguments, ``(op, tail)``, which the caller may call as
    ``op(x, residual, weight, bias, *tail)`` for later calls of the same metadata instead of the launcher
    (:func:`.cpp.direct_call`; ``None`` for ``dense``); ``None`` for the other backends."""
    if name != "cpu" and name != "cuda":
        return None
    return _backend("cpp").direct_call(x, eps, spec, mix_after_norm)


#: Backend name -> launcher.  Which backends can run here: :func:`noisynn_kernels.backend_info`.
LAUNCHERS = {
    "reference": launch_reference,
    "triton": launch_triton,
    "cpu": launch_cpu,
    "cuda": launch_cuda,
}
