"""Batch dependence: does a sample's prediction depend on the other samples in its batch?

:func:`batch_dependence` evaluates a model under class-sorted batches, shuffled batches and batch
size 1 (:func:`ordering_batches`, :func:`predict`), and reports the accuracy under each plus how much
any single sample's output moved when only the *rest of its batch* changed.  Sample-local noise must
show none; batch-axis mixing at inference (the official NoisyViT protocol) shows it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations

import torch
from torch import nn

from ..errors import ConfigError, ShapeError
from ..nn import NoiseInjection
from ._checks import (
    as_input,
    check_labels,
    check_model,
    check_noise_guard,
    model_device_dtype,
    positive_int,
)
from .data import as_source

__all__ = ["ORDERINGS", "ordering_batches", "rotated_batches", "predict", "default_tolerance", "BatchDependenceResult",
           "batch_dependence"]

#: Batch orderings :func:`batch_dependence` knows: ``sorted`` (stable sort by class, then consecutive
#: batches: the official NoisyViT test loader), ``shuffled`` (a seeded random permutation), ``single``
#: (batch size 1) and ``given`` (the data's own order).
ORDERINGS = ("sorted", "shuffled", "single", "given")


def ordering_batches(n: int, ordering: str, batch_size: int, targets: torch.Tensor | None = None,
                     seed: int = 0) -> list[torch.Tensor]:
    """The index batches of ``n`` samples under ``ordering`` (see :data:`ORDERINGS`).

    ``sorted`` needs ``targets``: a stable sort by label, then consecutive chunks of ``batch_size`` (a
    chunk straddles two classes where a class size is not a multiple of ``batch_size``).  ``shuffled``
    draws its permutation from ``torch.Generator().manual_seed(seed)``.  ``single`` ignores
    ``batch_size``.
    """
    n = positive_int("n", n)
    batch_size = positive_int("batch_size", batch_size)
    if ordering not in ORDERINGS:
        raise ConfigError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
    if ordering == "single":
        return [torch.tensor([i]) for i in range(n)]
    if ordering == "sorted":
        if targets is None:
            raise ConfigError("ordering='sorted' needs targets (class labels) to sort by, got targets=None")
        order = torch.sort(check_labels(targets, n), stable=True).indices
    elif ordering == "shuffled":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    else:
        order = torch.arange(n)
    return list(torch.split(order, batch_size))


def predict(model: nn.Module, data, batches: Sequence[torch.Tensor], *, device=None) -> torch.Tensor:
    """``model``'s outputs for every sample of ``data``, run batch by batch as ``batches`` (lists of
    sample indices) group them, returned in the original sample order as a float64 CPU tensor.

    ``data`` is a tensor ``(N, ...)``, a map-style ``Dataset`` of ``(input, label)`` pairs, a ``DataLoader``
    over one or a :class:`~noisynn_kernels.analysis.data.SampleSource`; a dataset is read batch by batch
    (never whole).  The model runs as it is (its train/eval mode is the caller's); no gradients are kept.
    """
    src = as_source(data)
    dev, dtype = model_device_dtype(check_model(model), device)
    out: torch.Tensor | None = None
    seen = torch.zeros(src.n, dtype=torch.bool)
    with torch.no_grad():
        for idx, x in src.batches(batches):
            y = model(as_input(x, dev, dtype))
            if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != len(idx):
                raise ShapeError(f"model must return (batch, classes) logits, got "
                                 f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__} "
                                 f"for a batch of {len(idx)}")
            if out is None:
                out = torch.full((src.n, y.shape[1]), math.nan, dtype=torch.float64)
            out[idx] = y.detach().to("cpu", torch.float64)
            seen[idx] = True
    if out is None or not bool(seen.all()):
        missing = int((~seen).sum())
        raise ConfigError(f"batches must cover every one of the {src.n} samples, {missing} were left out")
    return out


def rotated_batches(batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The full batches of ``batches`` (those as long as the first) regrouped so that every sample keeps
    its slot but gets new batch mates: new batch ``i`` takes slot ``j`` from batch ``(i + j) mod nb``.
    Returns ``(new batches, the samples they hold)``; batches of another length are left out."""
    size = len(batches[0])
    full = [b for b in batches if len(b) == size]
    nb = len(full)
    out = [torch.stack([full[(i + j) % nb][j] for j in range(size)]) for i in range(nb)]
    return out, torch.cat(full) if full else torch.empty(0, dtype=torch.long)


def _predict_same_draws(model, src, batches, device, seed: int) -> torch.Tensor:
    """:func:`predict` with every random stream restarted before each batch: the global RNG (and the CUDA
    one) from ``seed``, each :class:`~noisynn_kernels.NoiseInjection`'s own generator from its config.  A
    sample in the same slot of a batch of the same shape then draws the same noise.  The caller's RNG
    state is restored."""
    noise_modules = [m for m in model.modules() if isinstance(m, NoiseInjection)]
    dev, _ = model_device_dtype(model, device)

    class Restarting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            torch.manual_seed(seed)
            for m in noise_modules:
                m.reset_generator()
            return self.inner(x)

    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return predict(Restarting(), src, batches, device=device)


def default_tolerance(dtype: torch.dtype | None, scale: float) -> float:
    """Largest output change still counted as float noise, for outputs of magnitude up to ``scale``.

    ``rel * max(1, scale)`` with ``rel = 1e-4`` for float32 (about 800 float32 epsilons: a matmul's
    blocking, and so its rounding, differs between batch sizes, so bit-identical outputs are not
    expected), ``1e-10`` for float64 and ``2e-2`` for float16 / bfloat16.
    """
    rel = {torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 2e-2}.get(dtype, 1e-4)
    return rel * max(1.0, float(scale))


def _divergence(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    pa, pb = a.softmax(-1), b.softmax(-1)
    return {"max_logit_diff": float((a - b).abs().max()),
            "max_prob_diff": float((pa - pb).abs().max()),
            "mean_prob_diff": float((pa - pb).abs().sum(-1).mean() / 2),  # mean total-variation distance
            "n_argmax_changed": int((a.argmax(-1) != b.argmax(-1)).sum())}


@dataclass
class BatchDependenceResult:
    """What :func:`batch_dependence` measured.

    Attributes:
        orderings: the orderings evaluated, in order.
        batch_size: batch size of ``sorted``/``shuffled``/``given`` (``single`` uses 1).
        n_samples: samples evaluated.
        accuracy: top-1 accuracy per ordering (empty without targets).
        purity: per ordering, the fraction of samples whose batch holds a single class (empty without
            targets); 1.0 for ``single``.  High purity under ``sorted`` is what lets batch mixing leak labels.
        pairs: per pair ``"a|b"`` of orderings, ``max_logit_diff`` (largest absolute change of any single
            logit of any sample), ``max_prob_diff`` (same for softmax probabilities), ``mean_prob_diff``
            (mean total-variation distance between a sample's two output distributions) and
            ``n_argmax_changed`` (samples whose predicted class differs).
        max_logit_diff, max_prob_diff: the largest of ``pairs``' values.
        n_argmax_changed: samples whose predicted class is not the same under every ordering.
        tolerance: largest ``max_logit_diff`` still counted as float noise (see :func:`default_tolerance`).
        floor: the same divergence between two passes over *identical* batches (the first ordering run
            twice): zero for a deterministic model, the noise draw's own spread for random noise.
        noise: the model's NoiseConfig as a dict (``None`` without noise).
        paired: for a stochastic model, the same divergences between two passes that draw *the same noise for
            every sample* (each sample keeps its slot in a batch of the same shape, the random streams restart
            before every batch) while every sample's batch mates change (:func:`rotated_batches`), plus
            ``n_samples`` compared and ``floor_max_logit_diff`` (the same plan twice: zero when the draws are
            reproduced).  ``None`` for a deterministic model, or when the draws could not be reproduced or
            there are fewer than two full batches.
        outputs: per ordering, the ``(n_samples, classes)`` float64 logits in the original sample order
            (not written by :meth:`to_dict`).
    """

    orderings: tuple[str, ...]
    batch_size: int
    n_samples: int
    accuracy: dict[str, float]
    purity: dict[str, float]
    pairs: dict[str, dict[str, float]]
    max_logit_diff: float
    max_prob_diff: float
    n_argmax_changed: int
    tolerance: float
    floor: dict[str, float]
    noise: dict | None = None
    paired: dict | None = None
    outputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def stochastic(self) -> bool:
        """True when two passes over identical batches disagree beyond ``tolerance`` (random noise)."""
        return self.floor["max_logit_diff"] > self.tolerance

    @property
    def batch_dependent(self) -> bool | None:
        """Whether some sample's output changed beyond ``tolerance`` when only the rest of its batch
        changed.  For a stochastic model this is read off ``paired`` (the same noise draw per sample, other
        batch mates); ``None`` when that comparison was not possible: its outputs move between any two
        passes, so per-sample changes cannot be blamed on the batch (compare ``accuracy`` across orderings,
        and ``pairs`` with ``floor``, instead)."""
        if self.stochastic:
            if self.paired is None:
                return None
            return self.paired["max_logit_diff"] > self.tolerance
        return self.max_logit_diff > self.tolerance

    def to_dict(self) -> dict:
        """Plain-data form for JSON (without ``outputs``), with ``stochastic`` and ``batch_dependent``."""
        d = {k: v for k, v in asdict(self).items() if k != "outputs"}
        d["orderings"] = list(self.orderings)
        d["stochastic"] = self.stochastic
        d["batch_dependent"] = self.batch_dependent
        return d


def batch_dependence(model: nn.Module, data, targets: torch.Tensor | None = None, *,
                     batch_size: int = 10, orderings: Sequence[str] = ("sorted", "shuffled", "single"),
                     seed: int = 0, device=None, tolerance: float | None = None,
                     keep_outputs: bool = False) -> BatchDependenceResult:
    """Evaluate ``model`` under several batch orderings and measure how much a sample's prediction
    depends on the other samples in its batch.

    The model runs in eval mode with no gradients (its mode is restored afterwards), on the device of
    its parameters (or ``device``), with ``data`` cast to its parameters' float dtype.  Every sample is
    evaluated once per ordering (:func:`ordering_batches`: class-``sorted`` batches as the official
    NoisyViT test loader, ``shuffled`` batches, batch size 1 with ``single``), then its outputs are
    compared across orderings: only the rest of its batch changed, so any difference beyond float
    noise is batch dependence.  The first ordering is also run a second time on identical batches, to
    tell random noise (which differs between any two passes) from batch dependence.

    Sample-local models (no noise, linear noise along ``tokens`` or ``rows``, anything without
    cross-sample operations in eval mode) give ``max_logit_diff <= tolerance`` and
    ``batch_dependent == False``.

    A stochastic model (random noise: the repeat differs) is also compared on passes that draw the same
    noise for every sample (``paired``: the class-sorted batches, then the same full batches regrouped so
    that each sample keeps its slot and gets new batch mates, with the random streams restarted before
    every batch): salt-and-pepper taking each sample's own range shows no difference there, the batch-wide
    range (``value_range='batch'``) does.

    Args:
        model: a classifier returning ``(batch, classes)`` logits.
        data: ``(N, ...)`` inputs, a map-style ``Dataset`` of ``(input, label)`` pairs (e.g.
            :class:`~noisynn_kernels.analysis.data.ImageFolderDataset`), or a ``DataLoader`` over one (its
            workers and collate function are used, its batching is replaced by each ordering's).  A dataset is
            streamed batch by batch, never held in memory whole.
        targets: ``(N,)`` integer labels; needed for ``sorted`` and for accuracies.  A dataset's labels are
            used when not given (its ``targets`` attribute, else each item's label).
        batch_size: batch size of every ordering but ``single``.
        orderings: at least two of :data:`ORDERINGS`.
        seed: seed of the ``shuffled`` permutation.
        tolerance: largest ``max_logit_diff`` counted as float noise; default
            :func:`default_tolerance` for the model's dtype and the largest logit magnitude seen.
        keep_outputs: keep every ordering's logits in ``result.outputs``.

    Raises:
        BatchDependenceError: the model's noise config mixes the batch at eval without the explicit
            opt-in (only reachable by editing a validated config; the guard itself is in NoiseConfig).
        ConfigError, ShapeError: invalid arguments.
    """
    check_model(model)
    src = as_source(data, targets)
    if src.targets is None and not src.in_memory:
        src.read_targets()
    n = src.n
    batch_size = positive_int("batch_size", batch_size)
    if isinstance(orderings, str):
        raise ConfigError(f"orderings must be a sequence of ordering names, got the string {orderings!r}")
    orderings = tuple(orderings)
    bad = [o for o in orderings if o not in ORDERINGS]
    if bad or len(orderings) < 2 or len(set(orderings)) != len(orderings):
        raise ConfigError(f"orderings must be at least two distinct names from {ORDERINGS}, got {orderings!r}")
    labels = src.targets
    if "sorted" in orderings and labels is None:
        raise ConfigError("ordering 'sorted' needs targets (class labels) to sort by, got targets=None")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance >= 0):
        raise ConfigError(f"tolerance must be a number >= 0 or None, got {tolerance!r}")
    cfg = check_noise_guard(model)

    plans = {o: ordering_batches(n, o, batch_size, labels, seed) for o in orderings}
    was_training = model.training
    model.eval()
    try:
        outputs = {o: predict(model, src, plans[o], device=device) for o in orderings}
        repeat = predict(model, src, plans[orderings[0]], device=device)
    finally:
        model.train(was_training)

    _, dtype = model_device_dtype(model, device)
    if tolerance is None:
        scale = max(float(o.abs().max()) for o in outputs.values())
        tolerance = default_tolerance(dtype, scale)

    floor = _divergence(outputs[orderings[0]], repeat)
    paired = None
    if floor["max_logit_diff"] > tolerance:  # stochastic: compare passes that draw the same noise per sample
        base = ordering_batches(n, "sorted" if labels is not None else "given", batch_size, labels, seed)
        rotated, members = rotated_batches(base)
        if len(rotated) >= 2:
            rest = [b for b in base if len(b) != len(base[0])]  # kept in place: every sample is predicted
            plan = [b for b in base if len(b) == len(base[0])] + rest
            was_training = model.training
            model.eval()
            try:
                first = _predict_same_draws(model, src, plan, device, seed)
                again = _predict_same_draws(model, src, plan, device, seed)
                mates = _predict_same_draws(model, src, rotated + rest, device, seed)
            finally:
                model.train(was_training)
            same = _divergence(first[members], again[members])
            if same["max_logit_diff"] <= tolerance:
                paired = {**_divergence(first[members], mates[members]), "n_samples": len(members),
                          "floor_max_logit_diff": same["max_logit_diff"]}
    pairs = {f"{a}|{b}": _divergence(outputs[a], outputs[b]) for a, b in combinations(orderings, 2)}
    preds = torch.stack([outputs[o].argmax(-1) for o in orderings])
    n_changed = int((preds != preds[:1]).any(0).sum())
    accuracy, purity = {}, {}
    if labels is not None:
        for o in orderings:
            accuracy[o] = float((outputs[o].argmax(-1) == labels).double().mean())
            pure = sum(len(idx) for idx in plans[o] if bool((labels[idx] == labels[idx[0]]).all()))
            purity[o] = pure / n
    return BatchDependenceResult(
        orderings=orderings, batch_size=batch_size, n_samples=n, accuracy=accuracy, purity=purity, pairs=pairs,
        max_logit_diff=max(p["max_logit_diff"] for p in pairs.values()),
        max_prob_diff=max(p["max_prob_diff"] for p in pairs.values()),
        n_argmax_changed=n_changed, tolerance=float(tolerance),
        floor=floor, noise=None if cfg is None else cfg.to_dict(), paired=paired,
        outputs=outputs if keep_outputs else {})
