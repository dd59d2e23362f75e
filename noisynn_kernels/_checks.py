"""Checks of plain argument values (numbers, flags) and the axis names, written once for every layer.

Depends on :mod:`noisynn_kernels.errors` only, so the modules that describe a noise (``quality``,
``config``) and the argument checks of the ops (``_validate``) share it.
"""

from __future__ import annotations

import math

from .errors import ConfigError

__all__ = ["AXES", "VALUE_RANGES", "number", "flag", "traced"]

#: Axes along which linear transform noise can mix.
AXES = ("batch", "tokens", "rows")

#: Where salt-and-pepper takes the values it was not given: each sample's range, or the batch's.
VALUE_RANGES = ("sample", "batch")


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


def flag(name: str, value) -> bool:
    """``value``, which must be a bool (not merely truthy); else :class:`ConfigError`."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be a bool, got {value!r}")
    return value
