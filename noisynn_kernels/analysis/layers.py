"""Layer sensitivity: one small training run repeated with the noise at each block in turn
(:func:`layer_sensitivity`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..config import NoiseConfig
from ..errors import ConfigError
from ..models import apply_noisynn, model_blocks, remove_noisynn
from ._checks import check_model
from .batch import ORDERINGS
from .data import as_source
from .training import TrainSettings, evaluate_accuracy, train_classifier

__all__ = ["LayerSensitivity", "layer_sensitivity"]


@dataclass
class LayerSensitivity:
    """Per-block results of :func:`layer_sensitivity`.

    Attributes:
        noise: the noise config as a dict (its ``layer`` replaced for every run).
        layers: the block indices, in order.
        accuracy: per evaluation ordering, one accuracy per entry of ``layers``.
        final_loss: last-epoch training loss per entry of ``layers`` (``nan`` without training).
        baseline_accuracy: per ordering, the same run without noise (empty when not asked for).
        settings: the TrainSettings as a dict.
        seed: the seed of every run.
    """

    noise: dict
    layers: list[int]
    accuracy: dict[str, list[float]]
    final_loss: list[float]
    baseline_accuracy: dict[str, float]
    settings: dict
    seed: int

    def to_dict(self) -> dict:
        """Plain-data form for JSON."""
        return asdict(self)


def _pair(data, name: str):
    """``(inputs, labels)`` of an ``(x, y)`` pair; ``(source, None)`` of a Dataset / DataLoader."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ConfigError(f"{name} must be an (x, y) pair, a Dataset or a DataLoader, got a sequence of "
                              f"{len(data)} items")
        return tuple(data)
    return as_source(data, name=name), None


def layer_sensitivity(model_factory: Callable[[], nn.Module], noise, train_data, test_data, *,
                      layers: Sequence[int] | None = None,
                      settings: TrainSettings = TrainSettings(), seed: int = 0, eval_batch_size: int = 10,
                      orderings: Sequence[str] = ("shuffled",), baseline: bool = False, device=None,
                      on_run: Callable[[str], None] | None = None) -> LayerSensitivity:
    """The same small training run repeated with ``noise`` at each block in turn; per-block accuracies.

    For every block index ``i`` (default: every block of the model), ``torch.manual_seed(seed)`` then
    ``model_factory()`` builds the model (so every run starts from the same weights), the noise is
    attached with ``noise.replace(layer=i)`` (any noise applied by the factory is replaced), the model is
    trained with :func:`train_classifier` and evaluated with :func:`evaluate_accuracy` under each of
    ``orderings``.  A noise that is off in training (``train=False``, e.g. the official ViT protocol)
    does not change the training run, so the model is trained once and the noise moved between blocks.
    ``settings.epochs = 0`` evaluates the factory's model as it comes (e.g. an already trained model).

    Args:
        model_factory: zero-argument callable returning a fresh supported timm model.
        noise: NoiseConfig / dict / kind name (a batch-axis config on at eval needs its explicit opt-in).
        train_data, test_data: ``(x, y)`` pairs of tensors, or map-style ``Dataset`` / ``DataLoader`` of
            ``(input, label)`` pairs (streamed, see :func:`train_classifier`).
        layers: block indices to try (negative counts from the end).
        baseline: also run without noise (``baseline_accuracy``).
        on_run: called with a short description before each run (progress display).
    """
    cfg = NoiseConfig.coerce(noise)
    if cfg is None:
        raise ConfigError("noise must be a NoiseConfig, a dict of its fields or a kind name, got None")
    if not callable(model_factory):
        raise ConfigError(f"model_factory must be a zero-argument callable returning a model, "
                          f"got {type(model_factory).__name__}")
    (xtr, ytr), (xte, yte) = _pair(train_data, "train_data"), _pair(test_data, "test_data")
    if isinstance(orderings, str):
        orderings = (orderings,)
    orderings = tuple(orderings)
    if not orderings or any(o not in ORDERINGS for o in orderings):
        raise ConfigError(f"orderings must be names from {ORDERINGS}, got {orderings!r}")

    def fresh():
        torch.manual_seed(seed)
        m = check_model(model_factory())
        remove_noisynn(m)
        return m

    probe = fresh()
    n_blocks = len(model_blocks(probe))
    layers = list(range(n_blocks)) if layers is None else [int(i) for i in layers]
    for i in layers:
        if not -n_blocks <= i < n_blocks:
            raise ConfigError(f"layer {i} is out of range for a model with {n_blocks} blocks; "
                              f"expected {-n_blocks} <= layer < {n_blocks}")

    def evaluate(m):
        return {o: evaluate_accuracy(m, xte, yte, batch_size=eval_batch_size, ordering=o, seed=seed, device=device)
                for o in orderings}

    accuracy: dict[str, list[float]] = {o: [] for o in orderings}
    final_loss: list[float] = []
    base: dict[str, float] = {}
    shared = None  # the single training run of a noise that is off in training
    if baseline or not cfg.train:
        if on_run:
            on_run("no noise" if baseline else f"{cfg.kind}/{cfg.axis} (off in training): one run")
        shared = probe
        losses = train_classifier(shared, xtr, ytr, settings, seed=seed, device=device)
        shared_loss = losses[-1] if losses else math.nan
        if baseline:
            base = evaluate(shared)
    for i in layers:
        if not cfg.train:
            m, loss = copy.deepcopy(shared), shared_loss
            apply_noisynn(m, cfg.replace(layer=i))
        else:
            if on_run:
                on_run(f"{cfg.kind}/{cfg.axis} at block {i}")
            m = fresh()
            apply_noisynn(m, cfg.replace(layer=i))
            losses = train_classifier(m, xtr, ytr, settings, seed=seed, device=device)
            loss = losses[-1] if losses else math.nan
        for o, acc in evaluate(m).items():
            accuracy[o].append(acc)
        final_loss.append(loss)
    return LayerSensitivity(noise=cfg.to_dict(), layers=layers, accuracy=accuracy, final_loss=final_loss,
                            baseline_accuracy=base, settings=asdict(settings), seed=seed)
