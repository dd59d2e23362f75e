"""What every fused op's launchers share: the mix as op-schema arguments, the ``dense`` matrix, and
the autocast rule."""

from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from .. import quality
from .._op_codes import AXIS_CODES, KIND_CODES
from .._validate import MixSpec
from ..errors import BackendUnavailableError, ConfigError

__all__ = ["KIND_CODES", "AXIS_CODES", "MixArgs", "mix_args", "dense_mix_matrix", "check_triton_device",
           "device_guard", "autocast_cast", "autocast_off"]


class MixArgs(NamedTuple):
    """The schema arguments of a mix, in the order the ops take them."""

    kind: int
    axis: int
    alpha: float
    shift: int  # direction of the shift kind: +1 row i receives row i-1, -1 row i+1
    mix_matrix: Tensor | None
    prefix_tokens: int
    grid_w: int


# id(Q) -> (weak reference to Q, (device, k, Q's version counter), the checked fp32 M on that device).
# By identity (tensors compare elementwise); an entry goes when its Q is freed.
_DENSE_CACHE: dict = {}


def dense_mix_matrix(spec: MixSpec, device: torch.device) -> Tensor | None:
    """The fp32 ``K x K`` matrix ``M = I + Q`` a ``dense`` config passes to the ops (``None`` for the
    other kinds).  Raises :class:`ConfigError` for a ``Q`` that requires grad (the fused ops treat it as
    a constant) and for entries that overflow fp32.

    ``M`` is built and checked once on the host per ``Q``, device and size, and the device copy is
    cached: later calls do no host work, no host-device copy and no synchronization (so a dense layer
    can be captured in a CUDA graph).  Writing into ``Q`` in place makes a new entry (the key holds
    ``Q``'s version counter).  Under ``torch.compile`` the matrix is built in the graph instead."""
    cfg = spec.cfg
    if cfg.kind != "dense":
        return None
    q = cfg.matrix
    if q.requires_grad and torch.is_grad_enabled():
        raise ConfigError("the dense quality matrix requires grad, but the fused op treats it as a constant "
                          "(no gradient wrt Q); detach it, or use noisynn_kernels.reference to learn Q")
    if torch.compiler.is_compiling():
        # NoiseConfig has rejected non-finite Q; an fp32 overflow is checked in eager mode (below).
        return quality.mixing_matrix("dense", spec.k, matrix=q).to(device=device, dtype=torch.float32)
    key = (torch.device(device), spec.k, q._version)
    entry = _DENSE_CACHE.get(id(q))
    if entry is not None and entry[0]() is q and entry[1] == key:
        return entry[2]
    host = quality.mixing_matrix("dense", spec.k, matrix=q.detach().cpu()).to(torch.float32)
    if not torch.isfinite(host).all():  # NoiseConfig rejected non-finite Q; this catches fp32 overflow
        raise ConfigError("dense quality matrix has non-finite entries (in fp32); expected finite values")
    mix_matrix = host.to(device)
    qid = id(q)
    # one entry per Q (the newest version / device); dropped when Q is freed
    _DENSE_CACHE[qid] = (weakref.ref(q, lambda _, qid=qid: _DENSE_CACHE.pop(qid, None)), key, mix_matrix)
    return mix_matrix


def mix_args(spec: MixSpec, device: torch.device) -> MixArgs:
    """The mix of a checked ``spec`` as op-schema arguments (codes of :mod:`noisynn_kernels._op_codes`)."""
    cfg = spec.cfg
    grid_w = spec.grid[1] if spec.grid is not None else 1
    return MixArgs(KIND_CODES[cfg.kind], AXIS_CODES[cfg.axis], float(cfg.alpha), int(cfg.shift),
                   dense_mix_matrix(spec, device),
                   spec.prefix_tokens, grid_w)


def check_triton_device(t: Tensor, name: str, op: str, interpreted: bool) -> None:
    """The device and dtype limits every ``triton`` launcher shares: CUDA tensors, or CPU tensors under
    Triton's interpreter (``interpreted``), which has no bfloat16."""
    if t.device.type != "cuda" and not (interpreted and t.device.type == "cpu"):
        raise BackendUnavailableError(
            f"the triton {op} needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before triton is "
            f"imported), got {name} on {t.device}")
    if interpreted and t.dtype == torch.bfloat16:
        raise BackendUnavailableError(f"Triton's interpreter (TRITON_INTERPRET=1) has no bfloat16; got {name} of "
                                      "dtype torch.bfloat16, expected float16 or float32")


def device_guard(x: Tensor):
    """``x``'s CUDA device made current while a Triton op launches its kernels (Triton launches on the
    current device and stream: with ``x`` on ``cuda:1`` and ``cuda:0`` current, a launch would run on the
    wrong device or crash).  Nothing for CPU tensors, and nothing under ``torch.compile``, whose
    generated code guards the device itself."""
    if x.device.type == "cuda" and not torch.compiler.is_compiling():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def autocast_cast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors as autocast casts the inputs of ``F.scaled_dot_product_attention``: when autocast is
    on for their device, floating-point tensors other than fp64 in its dtype (under CUDA autocast a
    ``qk_norm`` model hands fp32 ``q``/``k`` and fp16 ``v`` to attention; SDPA takes that, and so must
    ``noisy_attention``); unchanged otherwise."""
    out = []
    for t in tensors:
        dev = t.device.type if isinstance(t, Tensor) else None
        if (dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and t.is_floating_point()
                and t.dtype != torch.float64):
            t = t.to(torch.get_autocast_dtype(dev))
        out.append(t)
    return tuple(out)


def autocast_off(x: Tensor):
    """Autocast disabled on ``x``'s device: a noise returns ``x``'s dtype under autocast on every
    backend (autocast would run the reference's dense ``M @ x`` in bf16/fp16 and return that dtype,
    while the fused kernels compute in fp32 and keep the input's dtype)."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()
