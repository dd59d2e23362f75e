"""Argument checks and input handling shared by the analysis modules.

The module is private; its names are public so that :mod:`.batch`, :mod:`.entropy`, :mod:`.training`
and :mod:`.layers` can share them.  It depends on the library only (``config``, ``errors``,
``models``), never on another analysis module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import NoiseConfig
from ..errors import BatchDependenceError, ConfigError, ShapeError
from ..models import noise_config

__all__ = ["positive_int", "check_model", "check_data", "check_labels", "check_noise_guard",
           "model_device_dtype", "as_input"]


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """``value``, which must be an int (not a bool) ``>= minimum``; else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_model(model) -> nn.Module:
    """``model``, which must be a ``torch.nn.Module``; else :class:`ConfigError`."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_data(data, name: str = "data") -> torch.Tensor:
    """``data``, which must be a tensor with at least one sample along dim 0; else :class:`ShapeError`."""
    if not isinstance(data, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor of samples (N, ...), got {type(data).__name__}")
    if data.dim() < 1 or data.shape[0] < 1:
        raise ShapeError(f"{name} must hold at least one sample along dim 0, got shape {tuple(data.shape)}")
    return data


def check_labels(labels, n: int, name: str = "targets") -> torch.Tensor:
    """``n`` integer class labels as a 1-D int64 CPU tensor; else :class:`ShapeError`."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise ShapeError(f"{name} must be a 1-D tensor of {n} integer class labels, "
                             f"got {type(labels).__name__}") from None
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ShapeError(f"{name} must be a 1-D tensor of {n} class labels (one per sample), "
                         f"got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ShapeError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    return labels.detach().to("cpu", torch.long)


def check_noise_guard(model: nn.Module) -> NoiseConfig | None:
    """The model's noise config; refuses one that mixes the batch at eval without its opt-in.

    ``NoiseConfig`` already raises at construction, so this only fires for a config whose frozen
    fields were altered behind the validator's back: the audit does not evaluate such a model."""
    cfg = noise_config(model)
    if cfg is not None and cfg.batch_dependent and cfg.eval and not cfg.allow_batch_dependence:
        raise BatchDependenceError(
            f"the model's noise (kind={cfg.kind!r}, axis='batch', eval=True) mixes the batch at inference "
            "without allow_batch_dependence=True; expected a config built with the explicit opt-in "
            "(e.g. NoiseConfig.official_vit(allow_batch_dependence=True)) before auditing it")
    return cfg


def model_device_dtype(model: nn.Module, device) -> tuple[torch.device, torch.dtype | None]:
    """``(device, dtype)`` to run ``model`` with: ``device`` (default: its parameters') and its parameters' dtype."""
    p = next(model.parameters(), None)
    if device is None:
        device = p.device if p is not None else torch.device("cpu")
    return torch.device(device), (p.dtype if p is not None else None)


def as_input(x: torch.Tensor, device, dtype) -> torch.Tensor:
    """``x`` on ``device``, floating-point inputs cast to ``dtype`` (when not ``None``)."""
    if x.is_floating_point() and dtype is not None:
        return x.to(device=device, dtype=dtype)
    return x.to(device=device)
