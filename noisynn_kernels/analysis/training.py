"""The small supervised training loop of the analyses (:func:`train_classifier`, :class:`TrainSettings`)
and accuracy under a batch ordering (:func:`evaluate_accuracy`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._checks import (
    as_input,
    check_data,
    check_labels,
    check_model,
    check_noise_guard,
    model_device_dtype,
    positive_int,
)
from .batch import ordering_batches, predict

__all__ = ["TrainSettings", "train_classifier", "evaluate_accuracy"]


@dataclass(frozen=True)
class TrainSettings:
    """One small supervised training run (:func:`train_classifier`): AdamW with a one-cycle schedule.

    Attributes:
        epochs: passes over the training set (``0``: no training).
        batch_size: training batch size (the last, smaller batch of an epoch is kept).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: fraction of the steps spent warming up (one-cycle ``pct_start``).
        label_smoothing: cross-entropy label smoothing.
    """

    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self):
        positive_int("epochs", self.epochs, minimum=0)
        positive_int("batch_size", self.batch_size)
        for name, lo, hi in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf), ("warmup", 0.0, 1.0),
                             ("label_smoothing", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number in [{lo}, {hi}], got {v!r}")


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings = TrainSettings(),
                     *, seed: int = 0, device=None,
                     on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy; returns the mean loss of every epoch.

    The batch order comes from ``torch.Generator().manual_seed(seed)``; the global RNG is seeded with
    ``seed`` too, so random noise draws are reproducible.  The model is left in eval mode.
    ``on_epoch(epoch, mean_loss)`` is called after every epoch.
    """
    check_model(model)
    x = check_data(x, "x")
    y = check_labels(y, x.shape[0], "y")
    if not isinstance(settings, TrainSettings):
        raise ConfigError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    dev, dtype = model_device_dtype(model, device)
    losses: list[float] = []
    if settings.epochs == 0:
        model.eval()
        return losses
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(x.shape[0] / settings.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch,
                                                pct_start=settings.warmup, anneal_strategy="cos")
    y_dev = y.to(dev)
    model.train()
    for epoch in range(settings.epochs):
        total = 0.0
        for idx in torch.split(torch.randperm(x.shape[0], generator=g), settings.batch_size):
            loss = F.cross_entropy(model(as_input(x[idx], dev, dtype)), y_dev[idx.to(dev)],
                                   label_smoothing=settings.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / x.shape[0])
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses


def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y, *, batch_size: int = 10, ordering: str = "shuffled",
                      seed: int = 0, device=None) -> float:
    """Top-1 accuracy of ``model`` (in eval mode, restored afterwards) with batches formed by ``ordering``."""
    x = check_data(x, "x")
    y = check_labels(y, x.shape[0], "y")
    check_noise_guard(check_model(model))
    was_training = model.training
    model.eval()
    try:
        logits = predict(model, x, ordering_batches(x.shape[0], ordering, batch_size, y, seed), device=device)
    finally:
        model.train(was_training)
    return float((logits.argmax(-1) == y).double().mean())

