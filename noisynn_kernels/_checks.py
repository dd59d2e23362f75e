"""Checks of plain argument values (numbers, flags, the shift direction) and the axis names, written once
for every layer.

Depends on :mod:`noisynn_kernels.errors` only, so the modules that describe a noise (``quality``,
``config``) and the argument checks of the ops (``_validate``) share it.
"""

from __future__ import annotations

import math

from .errors import ConfigError

__all__ = ["AXES", "VALUE_RANGES", "SHIFTS", "number", "flag", "shift_direction", "traced"]

#: Axes along which linear transform noise can mix.
AXES = ("batch", "tokens", "rows")

#: Where salt-and-pepper takes the values it was not given: each sample's range, or the batch's.
VALUE_RANGES = ("sample", "batch")

#: Directions of the ``shift`` kind, as ``torch.roll``'s ``shifts``: with ``+1`` (the paper's
#: ``P[(i+1) mod k, i] = 1``) row ``i`` receives row ``i - 1``; with ``-1`` (the official CNN code's
#: ``cat(x[1:], x[:1])``) row ``i`` receives row ``i + 1``.
SHIFTS = (1, -1)


def traced(value) -> bool:
    """Whether ``value`` is being traced by ``torch.compile`` rather than known: a symbolic size or float
    (dynamic shapes), or any number while compiling (Dynamo may trace a config's float as symbolic).
    Checks of such values are left to eager calls: the graph has no value to check, and NoiseConfig
    has checked its own fields at construction."""
    import torch

    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) or torch.compiler.is_compiling()


def number(name: str, value, *, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``value`` as a float, which must be finite and in ``[lo, hi]``; else :class:`ConfigError`.  A
    traced value (``torch.compile`` with dynamic shapes) passes through unchecked."""
    if traced(value):
        return value
    if isinstance(value, bool):  # float(True) == 1.0 would pass silently
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ConfigError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
    return v


def shift_direction(value) -> int:
    """``value``, which must be ``+1`` or ``-1`` (an int, not a bool or a float); else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in SHIFTS:
        raise ConfigError(f"shift must be +1 (row i receives row i-1, the paper's P) or -1 (row i receives row i+1, "
                          f"the official CNN code), got {value!r}")
    return int(value)


def flag(name: str, value) -> bool:
    """``value``, which must be a bool (not merely truthy); else :class:`ConfigError`."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be a bool, got {value!r}")
    return value
