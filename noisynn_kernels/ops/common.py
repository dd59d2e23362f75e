"""What every fused op's launchers share: the mix as op-schema arguments, the ``dense`` matrix, and
the autocast rule."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from .. import quality
from .._op_codes import AXIS_CODES, KIND_CODES
from .._validate import MixSpec
from ..errors import ConfigError

__all__ = ["KIND_CODES", "AXIS_CODES", "MixArgs", "mix_args", "dense_mix_matrix", "autocast_off"]


class MixArgs(NamedTuple):
    """The schema arguments of a mix, in the order the ops take them."""

    kind: int
    axis: int
    alpha: float
    mix_matrix: Tensor | None
    prefix_tokens: int
    grid_w: int


def dense_mix_matrix(spec: MixSpec, device: torch.device) -> Tensor | None:
    """The fp32 ``K x K`` matrix ``M = I + Q`` a ``dense`` config passes to the ops (``None`` for the
    other kinds).  Raises :class:`ConfigError` for a ``Q`` that requires grad (the fused ops treat it as
    a constant) and, in eager mode, for entries that overflow fp32."""
    cfg = spec.cfg
    if cfg.kind != "dense":
        return None
    q = cfg.matrix
    if q.requires_grad and torch.is_grad_enabled():
        raise ConfigError("the dense quality matrix requires grad, but the fused op treats it as a constant "
                          "(no gradient wrt Q); detach it, or use noisynn_kernels.reference to learn Q")
    mix_matrix = quality.mixing_matrix("dense", spec.k, matrix=q).to(device=device, dtype=torch.float32)
    # Data-dependent (a graph break under torch.compile): checked in eager only.  NoiseConfig has
    # rejected non-finite Q already; this catches values that overflow fp32.
    if not torch.compiler.is_compiling() and not torch.isfinite(mix_matrix).all():
        raise ConfigError("dense quality matrix has non-finite entries (in fp32); expected finite values")
    return mix_matrix


def mix_args(spec: MixSpec, device: torch.device) -> MixArgs:
    """The mix of a checked ``spec`` as op-schema arguments (codes of :mod:`noisynn_kernels._op_codes`)."""
    cfg = spec.cfg
    grid_w = spec.grid[1] if spec.grid is not None else 1
    return MixArgs(KIND_CODES[cfg.kind], AXIS_CODES[cfg.axis], float(cfg.alpha), dense_mix_matrix(spec, device),
                   spec.prefix_tokens, grid_w)


def autocast_off(x: Tensor):
    """Autocast disabled on ``x``'s device: a noise returns ``x``'s dtype under autocast on every
    backend (autocast would run the reference's dense ``M @ x`` in bf16/fp16 and return that dtype,
    while the fused kernels compute in fp32 and keep the input's dtype)."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()
