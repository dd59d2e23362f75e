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
    check_model,
    check_noise_guard,
    model_device_dtype,
    positive_int,
)
from .batch import ordering_batches, predict
from .data import as_source

__all__ = ["TrainSettings", "train_classifier", "evaluate_accuracy"]


@dataclass(frozen=True)
class TrainSettings:
    """One small supervised training run (:func:`train_classifier`): AdamW with a one-cycle schedule (warm-up at
    least two steps; runs under four steps keep the peak rate).

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


def train_classifier(model: nn.Module, x, y=None, settings: TrainSettings = TrainSettings(),
                     *, seed: int = 0, device=None,
                     on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy; returns the mean loss of every epoch.

    ``x`` is a tensor of inputs, a map-style ``Dataset`` of ``(input, label)`` pairs or a ``DataLoader``
    over one (streamed batch by batch; its labels are used when ``y`` is ``None``).  The batch order
    comes from ``torch.Generator().manual_seed(seed)``; the global RNG is seeded with ``seed`` too, so
    random noise draws are reproducible.  The model is left in eval mode.  ``on_epoch(epoch, mean_loss)``
    is called after every epoch.
    """
    check_model(model)
    src = as_source(x, y, name="x")
    y = src.read_targets() if y is None else src.targets
    n = src.n
    if not isinstance(settings, TrainSettings):
        raise ConfigError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    dev, dtype = model_device_dtype(model, device)
    losses: list[float] = []
    if settings.epochs == 0:
        model.eval()
        return losses
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    total = settings.epochs * steps_per_epoch
    if total >= 4:
        # OneCycleLR divides by its warm-up length in steps: at least 2 steps (unchanged for any longer run).
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=total,
                                                    pct_start=max(settings.warmup, 2.0 / total), anneal_strategy="cos")
    else:  # too few steps for a schedule: the peak rate throughout
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    y_dev = y.to(dev)
    model.train()
    for epoch in range(settings.epochs):
        total = 0.0
        plan = list(torch.split(torch.randperm(n, generator=g), settings.batch_size))
        for idx, xb in src.batches(plan):
            loss = F.cross_entropy(model(as_input(xb, dev, dtype)), y_dev[idx.to(dev)],
                                   label_smoothing=settings.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / n)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses


def evaluate_accuracy(model: nn.Module, x, y=None, *, batch_size: int = 10, ordering: str = "shuffled",
                      seed: int = 0, device=None) -> float:
    """Top-1 accuracy of ``model`` (in eval mode, restored afterwards) with batches formed by ``ordering``.

    ``x``: a tensor, a ``Dataset`` of ``(input, label)`` pairs or a ``DataLoader`` (its labels are used when
    ``y`` is ``None``), streamed batch by batch."""
    src = as_source(x, y, name="x")
    y = src.read_targets() if y is None else src.targets
    check_noise_guard(check_model(model))
    was_training = model.training
    model.eval()
    try:
        logits = predict(model, src, ordering_batches(src.n, ordering, batch_size, y, seed), device=device)
    finally:
        model.train(was_training)
    return float((logits.argmax(-1) == y).double().mean())

