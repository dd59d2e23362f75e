"""Honest diagnostics for NoisyNN: batch dependence, entropy estimates and layer sensitivity.

- :func:`batch_dependence` evaluates a model under class-sorted batches, shuffled batches and batch
  size 1, and reports the accuracy under each plus how much any single sample's output moved when
  only the *rest of its batch* changed.  Sample-local noise must show none; batch-axis mixing at
  inference (the official NoisyViT protocol) shows it.
- :func:`gaussian_entropy`, :func:`conditional_entropy_gaussian` and :func:`entropy_diagnostics`
  estimate ``H(Z)`` and ``H(Y|Z)`` of a features tensor under Gaussian assumptions, before and after
  a noise, next to the paper's entropy change ``dS = -log|det(I+Q)|`` (:func:`entropy_change`).
- :func:`layer_sensitivity` repeats one small training run with the noise at each block in turn.

The batch-dependence guard of :class:`~noisynn_kernels.NoiseConfig` is never bypassed here: nothing
in this module builds a batch-axis config or flips ``allow_batch_dependence``.  A model whose noise
mixes the batch at inference can only reach these functions if its config was opted in explicitly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as _functional
from . import quality
from .config import NoiseConfig
from .errors import BatchDependenceError, ConfigError, ShapeError
from .quality import entropy_change

__all__ = [
    "ORDERINGS",
    "ordering_batches",
    "BatchDependenceResult",
    "batch_dependence",
    "default_tolerance",
    "entropy_change",
    "label_entropy",
    "gaussian_entropy",
    "shrunk_covariance",
    "conditional_entropy_gaussian",
    "apply_noise",
    "EntropyDiagnostics",
    "entropy_diagnostics",
    "TrainSettings",
    "train_classifier",
    "predict",
    "evaluate_accuracy",
    "LayerSensitivity",
    "layer_sensitivity",
]

#: Batch orderings :func:`batch_dependence` knows: ``sorted`` (stable sort by class, then consecutive
#: batches: the official NoisyViT test loader), ``shuffled`` (a seeded random permutation), ``single``
#: (batch size 1) and ``given`` (the data's own order).
ORDERINGS = ("sorted", "shuffled", "single", "given")


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def _positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_data(data, name: str = "data") -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor of samples (N, ...), got {type(data).__name__}")
    if data.dim() < 1 or data.shape[0] < 1:
        raise ShapeError(f"{name} must hold at least one sample along dim 0, got shape {tuple(data.shape)}")
    return data


def _check_labels(labels, n: int, name: str = "targets") -> torch.Tensor:
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


def _check_noise_guard(model: nn.Module) -> Optional[NoiseConfig]:
    """The model's noise config; refuses one that mixes the batch at eval without its opt-in.

    ``NoiseConfig`` already raises at construction, so this only fires for a config whose frozen
    fields were altered behind the validator's back: the audit does not evaluate such a model."""
    from .models.patch import noise_config

    cfg = noise_config(model)
    if cfg is not None and cfg.mixes_batch and cfg.eval and not cfg.allow_batch_dependence:
        raise BatchDependenceError(
            f"the model's noise (kind={cfg.kind!r}, axis='batch', eval=True) mixes the batch at inference "
            "without allow_batch_dependence=True; expected a config built with the explicit opt-in "
            "(e.g. NoiseConfig.official_vit(allow_batch_dependence=True)) before auditing it")
    return cfg


def _model_device_dtype(model: nn.Module, device) -> Tuple[torch.device, Optional[torch.dtype]]:
    p = next(model.parameters(), None)
    if device is None:
        device = p.device if p is not None else torch.device("cpu")
    return torch.device(device), (p.dtype if p is not None else None)


def _as_input(x: torch.Tensor, device, dtype) -> torch.Tensor:
    if x.is_floating_point() and dtype is not None:
        return x.to(device=device, dtype=dtype)
    return x.to(device=device)


# --------------------------------------------------------------------------------------------------
# batch orderings and inference
# --------------------------------------------------------------------------------------------------
def ordering_batches(n: int, ordering: str, batch_size: int, targets: Optional[torch.Tensor] = None,
                     seed: int = 0) -> List[torch.Tensor]:
    """The index batches of ``n`` samples under ``ordering`` (see :data:`ORDERINGS`).

    ``sorted`` needs ``targets``: a stable sort by label, then consecutive chunks of ``batch_size`` (a
    chunk straddles two classes where a class size is not a multiple of ``batch_size``).  ``shuffled``
    draws its permutation from ``torch.Generator().manual_seed(seed)``.  ``single`` ignores
    ``batch_size``.
    """
    n = _positive_int("n", n)
    batch_size = _positive_int("batch_size", batch_size)
    if ordering not in ORDERINGS:
        raise ConfigError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
    if ordering == "single":
        return [torch.tensor([i]) for i in range(n)]
    if ordering == "sorted":
        if targets is None:
            raise ConfigError("ordering='sorted' needs targets (class labels) to sort by, got targets=None")
        order = torch.sort(_check_labels(targets, n), stable=True).indices
    elif ordering == "shuffled":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    else:
        order = torch.arange(n)
    return list(torch.split(order, batch_size))


def predict(model: nn.Module, data: torch.Tensor, batches: Sequence[torch.Tensor], *,
            device=None) -> torch.Tensor:
    """``model``'s outputs for every sample of ``data``, run batch by batch as ``batches`` (lists of
    sample indices) group them, returned in the original sample order as a float64 CPU tensor.

    The model runs as it is (its train/eval mode is the caller's); no gradients are kept.
    """
    data = _check_data(data)
    dev, dtype = _model_device_dtype(_check_model(model), device)
    out: Optional[torch.Tensor] = None
    seen = torch.zeros(data.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for idx in batches:
            y = model(_as_input(data[idx], dev, dtype))
            if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != len(idx):
                raise ShapeError(f"model must return (batch, classes) logits, got "
                                 f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__} "
                                 f"for a batch of {len(idx)}")
            if out is None:
                out = torch.full((data.shape[0], y.shape[1]), math.nan, dtype=torch.float64)
            out[idx] = y.detach().to("cpu", torch.float64)
            seen[idx] = True
    if out is None or not bool(seen.all()):
        missing = int((~seen).sum())
        raise ConfigError(f"batches must cover every one of the {data.shape[0]} samples, {missing} were left out")
    return out


def default_tolerance(dtype: Optional[torch.dtype], scale: float) -> float:
    """Largest output change still counted as float noise, for outputs of magnitude up to ``scale``.

    ``rel * max(1, scale)`` with ``rel = 1e-4`` for float32 (about 800 float32 epsilons: a matmul's
    blocking, and so its rounding, differs between batch sizes, so bit-identical outputs are not
    expected), ``1e-10`` for float64 and ``2e-2`` for float16 / bfloat16.
    """
    rel = {torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 2e-2}.get(dtype, 1e-4)
    return rel * max(1.0, float(scale))


def _divergence(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
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
        outputs: per ordering, the ``(n_samples, classes)`` float64 logits in the original sample order
            (not written by :meth:`to_dict`).
    """

    orderings: Tuple[str, ...]
    batch_size: int
    n_samples: int
    accuracy: Dict[str, float]
    purity: Dict[str, float]
    pairs: Dict[str, Dict[str, float]]
    max_logit_diff: float
    max_prob_diff: float
    n_argmax_changed: int
    tolerance: float
    floor: Dict[str, float]
    noise: Optional[dict] = None
    outputs: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def stochastic(self) -> bool:
        """True when two passes over identical batches disagree beyond ``tolerance`` (random noise)."""
        return self.floor["max_logit_diff"] > self.tolerance

    @property
    def batch_dependent(self) -> Optional[bool]:
        """Whether some sample's output changed beyond ``tolerance`` when only the rest of its batch
        changed.  ``None`` for a stochastic model: its outputs move between any two passes, so per-sample
        changes cannot be blamed on the batch (compare ``accuracy`` across orderings, and ``pairs`` with
        ``floor``, instead)."""
        if self.stochastic:
            return None
        return self.max_logit_diff > self.tolerance

    def to_dict(self) -> dict:
        """Plain-data form for JSON (without ``outputs``), with ``stochastic`` and ``batch_dependent``."""
        d = {k: v for k, v in asdict(self).items() if k != "outputs"}
        d["orderings"] = list(self.orderings)
        d["stochastic"] = self.stochastic
        d["batch_dependent"] = self.batch_dependent
        return d


def batch_dependence(model: nn.Module, data: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                     batch_size: int = 10, orderings: Sequence[str] = ("sorted", "shuffled", "single"),
                     seed: int = 0, device=None, tolerance: Optional[float] = None,
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

    Args:
        model: a classifier returning ``(batch, classes)`` logits.
        data: ``(N, ...)`` inputs.
        targets: ``(N,)`` integer labels; needed for ``sorted`` and for accuracies.
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
    _check_model(model)
    data = _check_data(data)
    n = data.shape[0]
    batch_size = _positive_int("batch_size", batch_size)
    if isinstance(orderings, str):
        raise ConfigError(f"orderings must be a sequence of ordering names, got the string {orderings!r}")
    orderings = tuple(orderings)
    bad = [o for o in orderings if o not in ORDERINGS]
    if bad or len(orderings) < 2 or len(set(orderings)) != len(orderings):
        raise ConfigError(f"orderings must be at least two distinct names from {ORDERINGS}, got {orderings!r}")
    labels = None if targets is None else _check_labels(targets, n)
    if "sorted" in orderings and labels is None:
        raise ConfigError("ordering 'sorted' needs targets (class labels) to sort by, got targets=None")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance >= 0):
        raise ConfigError(f"tolerance must be a number >= 0 or None, got {tolerance!r}")
    cfg = _check_noise_guard(model)

    plans = {o: ordering_batches(n, o, batch_size, labels, seed) for o in orderings}
    was_training = model.training
    model.eval()
    try:
        outputs = {o: predict(model, data, plans[o], device=device) for o in orderings}
        repeat = predict(model, data, plans[orderings[0]], device=device)
    finally:
        model.train(was_training)

    _, dtype = _model_device_dtype(model, device)
    if tolerance is None:
        scale = max(float(o.abs().max()) for o in outputs.values())
        tolerance = default_tolerance(dtype, scale)

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
        floor=_divergence(outputs[orderings[0]], repeat),
        noise=None if cfg is None else cfg.to_dict(),
        outputs=outputs if keep_outputs else {})


# --------------------------------------------------------------------------------------------------
# entropy diagnostics
# --------------------------------------------------------------------------------------------------
_LOG_2PI_E = math.log(2 * math.pi * math.e)


def _features_matrix(features, name: str = "features") -> torch.Tensor:
    features = _check_data(features, name)
    if not (features.is_floating_point() or features.dtype in (torch.int8, torch.int16, torch.int32,
                                                                   torch.int64, torch.uint8)):
        raise ShapeError(f"{name} must be a real tensor, got dtype {features.dtype}")
    z = features.detach().to("cpu", torch.float64).reshape(features.shape[0], -1)
    if not torch.isfinite(z).all():
        raise ShapeError(f"{name} has non-finite entries; expected finite features")
    return z


def _check_shrinkage(shrinkage) -> Union[float, str]:
    if shrinkage == "auto":
        return shrinkage
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"shrinkage must be a number in [0, 1] or 'auto' (Ledoit-Wolf), got {shrinkage!r}")
    return float(shrinkage)


def shrunk_covariance(centered: torch.Tensor, shrinkage: Union[float, str] = 0.0, *,
                      dof: Optional[int] = None) -> Tuple[torch.Tensor, float]:
    """Covariance of already-centred rows, shrunk towards ``(tr S / d) I``; returns ``(cov, shrinkage)``.

    ``S = centered^T centered / dof`` (``dof`` defaults to ``n - 1``), ``cov = (1-s) S + s (tr S / d) I``.
    ``shrinkage='auto'`` takes the Ledoit-Wolf estimate of ``s`` (the MSE-optimal intensity for
    independent rows); a number in ``[0, 1]`` is used as given.
    """
    shrinkage = _check_shrinkage(shrinkage)
    x = centered.to(torch.float64)
    n, d = x.shape
    dof = n - 1 if dof is None else dof
    if dof < 1:
        raise ShapeError(f"a covariance needs more samples than fitted means: {n} samples, {n - dof} means")
    gram = x.T @ x
    S = gram / dof
    mu = float(S.diagonal().mean())
    if shrinkage == "auto":
        # Ledoit & Wolf (2004): s = min(beta2, delta2) / delta2 with the biased (1/n) sample covariance
        # Sb; ||Sb - m I||^2 = ||Sb||^2 - d m^2 for m = tr(Sb) / d.
        sb_sq = float(gram.pow(2).sum()) / n ** 2
        mub = float(gram.diagonal().sum()) / (n * d)
        delta2 = (sb_sq - d * mub ** 2) / d
        beta2 = (float((x.pow(2).sum(1) ** 2).sum()) / n - sb_sq) / (n * d)
        shrinkage = 0.0 if delta2 <= 0 else min(max(beta2, 0.0), delta2) / delta2
    if shrinkage:
        S = (1 - shrinkage) * S
        S.diagonal().add_(shrinkage * mu)
    return S, float(shrinkage)


def _cholesky_pd(S: torch.Tensor, what: str) -> Tuple[torch.Tensor, float]:
    """``(L, ln|S|)`` of a covariance; raises a ShapeError when it is singular (to working precision)."""
    L, info = torch.linalg.cholesky_ex(S)
    pivots = L.diagonal().pow(2) if int(info) == 0 else None
    scale = float(S.diagonal().abs().max()) if S.numel() else 0.0
    if pivots is None or not bool(torch.isfinite(pivots).all()) or float(pivots.min()) <= max(1e-12 * scale, 1e-300):
        raise ShapeError(f"the {what} covariance ({S.shape[0]} x {S.shape[0]}) is singular to working precision: "
                         "use more samples than feature dimensions or pass shrinkage > 0 (or 'auto')")
    return L, float(pivots.log().sum())


def label_entropy(labels) -> float:
    """Entropy ``H(Y)`` of the empirical label distribution, in nats (``ln C`` for balanced classes)."""
    labels = _check_labels(labels, len(labels), "labels")
    counts = torch.bincount(labels - labels.min()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def gaussian_entropy(features: torch.Tensor, *, shrinkage: Union[float, str] = 0.0) -> float:
    """Differential entropy ``H(Z) = 1/2 ln((2 pi e)^d |S_Z|)`` of a Gaussian fitted to the samples, in nats.

    ``features`` is ``(N, ...)``, flattened to ``(N, d)``; ``S_Z`` is the sample covariance (see
    :func:`shrunk_covariance`).  It is the exact entropy when the features are Gaussian and an upper
    bound on a non-Gaussian distribution with that covariance.  An invertible linear map ``A`` on the
    feature vector adds ``ln|det A|`` exactly (with ``shrinkage=0``): for NoisyNN's mixing along an axis
    of ``k`` rows of a per-sample block of ``d`` features, ``ln|det A| = (d / k) ln|det M| = -(d/k) dS``.
    """
    z = _features_matrix(features)
    if z.shape[0] < 2:
        raise ShapeError(f"gaussian_entropy needs at least 2 samples, got {z.shape[0]}")
    S, _ = shrunk_covariance(z - z.mean(0), shrinkage)
    return 0.5 * (z.shape[1] * _LOG_2PI_E + _cholesky_pd(S, "feature")[1])


def _stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold id of every sample, each class dealt round-robin over the folds after a seeded shuffle."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = torch.arange(len(idx)) % folds
    return fold


def _discriminant_scores(z_fit, y_fit, z_eval, classes, covariance, shrinkage):
    """``(log p(z | y) up to a constant, log p(y))`` on ``z_eval`` for every class of ``classes``, from
    Gaussians fitted on ``(z_fit, y_fit)``: an ``(n_eval, C)`` and a ``(C,)`` tensor."""
    log_prior, means = [], []
    for c in classes:
        zc = z_fit[y_fit == c]
        log_prior.append(math.log(len(zc) / len(z_fit)))
        means.append(zc.mean(0))
    means_t = torch.stack(means)
    scores = torch.empty(len(z_eval), len(classes), dtype=torch.float64)
    if covariance == "shared":
        centered = z_fit - means_t[torch.searchsorted(classes, y_fit)]
        S, _ = shrunk_covariance(centered, shrinkage, dof=len(z_fit) - len(classes))
        L, _ = _cholesky_pd(S, "pooled within-class")
        w_eval = torch.linalg.solve_triangular(L, z_eval.T, upper=False).T
        w_means = torch.linalg.solve_triangular(L, means_t.T, upper=False).T
        # The shared log-determinant is the same for every class: it cancels in the posterior.
        scores = -0.5 * torch.cdist(w_eval, w_means).pow(2)
    else:
        for j, c in enumerate(classes):
            zc = z_fit[y_fit == c]
            if len(zc) < 2:
                raise ShapeError(f"covariance='per_class' needs at least 2 samples of every class in each fit, "
                                 f"class {int(c)} has {len(zc)}")
            S, _ = shrunk_covariance(zc - means_t[j], shrinkage)
            L, logdet = _cholesky_pd(S, f"class {int(c)}")
            w = torch.linalg.solve_triangular(L, (z_eval - means_t[j]).T, upper=False).T
            scores[:, j] = -0.5 * w.pow(2).sum(1) - 0.5 * logdet
    return scores, torch.tensor(log_prior, dtype=torch.float64)


def _cross_entropy(loglik: torch.Tensor, log_prior: torch.Tensor, target: torch.Tensor, beta: float) -> float:
    logp = (beta * loglik + log_prior).log_softmax(-1)
    return -float(logp.gather(1, target[:, None]).mean())


def _fit_inverse_temperature(loglik, log_prior, target) -> float:
    """The ``beta >= 0`` minimising the cross-entropy of ``softmax(beta * loglik + log_prior)``.

    The objective is convex in ``beta`` (log-sum-exp of affine functions minus an affine one): bracket
    the minimum by doubling, then golden-section search."""
    f = lambda b: _cross_entropy(loglik, log_prior, target, b)  # noqa: E731
    hi = 1.0
    while hi < 1e6 and f(2 * hi) < f(hi):
        hi *= 2
    lo, hi = 0.0, 2 * hi
    r = (math.sqrt(5) - 1) / 2
    a, b = hi - r * (hi - lo), lo + r * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(80):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - r * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + r * (hi - lo)
            fb = f(b)
    best = min((0.0, f(0.0)), (1.0, f(1.0)), ((lo + hi) / 2, f((lo + hi) / 2)), key=lambda t: t[1])
    return best[0]


def conditional_entropy_gaussian(features: torch.Tensor, labels, *, method: str = "discriminant",
                                 covariance: str = "shared", shrinkage: Union[float, str] = "auto",
                                 folds: int = 5, calibrate: bool = True, seed: int = 0) -> float:
    """A Gaussian estimate of the task complexity ``H(Y|Z)`` of features ``Z`` for labels ``Y``, in nats.

    ``method='discriminant'`` (default): fit class-conditional Gaussians ``p(z|y) = N(mu_y, S)``
    (``covariance='shared'``: one pooled within-class covariance, linear discriminant analysis;
    ``'per_class'``: one covariance per class, quadratic discriminant analysis) and class priors, and
    return the cross-entropy ``-mean_i ln p(y_i | z_i)`` of the Bayes posterior they imply.  With
    ``folds >= 2`` every sample is scored by Gaussians fitted on the other folds (stratified, seeded),
    so the value is an honest held-out estimate.  Assumptions and reading:

    - if the classes really are Gaussian with the assumed covariance structure, the estimate converges
      to ``H(Y|Z)``; otherwise the held-out cross-entropy is, up to sampling error, an *upper bound* on
      ``H(Y|Z)`` (a misspecified posterior never has lower expected log loss than the true one);
    - the result lies in ``[0, H(Y)]``-ish: ``0`` for perfectly separable classes, about ``H(Y)``
      (``ln C`` for ``C`` balanced classes) for features that carry no label information;
    - ``calibrate=True`` scales the class log-likelihoods by one inverse temperature ``beta >= 0`` that
      minimises the held-out cross-entropy (``beta = 1``: the plain Gaussian posterior; ``beta = 0``: the
      class prior alone, whose cross-entropy is ``H(Y)`` up to the folds' prior estimates).  Cross-entropy
      punishes confident mistakes without bound, and a misspecified Gaussian fit can be grossly
      overconfident (e.g. features collapsed onto a few points by batch-axis mixing); the fitted scalar
      keeps the value at or below the prior's and leaves a well-specified fit (``beta`` near 1) alone.
      Fitting one scalar on ``N`` scores biases the estimate low by ``O(1/N)`` only;
    - ``folds < 2`` scores the samples the Gaussians were fitted on: biased low, worse in high dimension;
    - shrinkage (``'auto'``: Ledoit-Wolf) regularises the covariance when ``d`` is not small next to
      ``N``; with ``shrinkage=0`` the estimate is exactly invariant under any invertible linear map of
      the feature vector (as ``H(Y|Z)`` itself is), so NoisyNN's sample-local ``(I+Q)`` leaves it unchanged.

    ``method='joint'``: the formula of the paper's analysis, ``1/2 ln((2 pi e)^dy |S_Y - S_YZ S_Z^-1 S_ZY|)``,
    with ``Y`` the one-hot label without its last column (``dy = C - 1``) treated as jointly Gaussian with
    ``Z`` (in-sample; ``folds`` and ``covariance`` are not used, ``shrinkage`` applies to ``S_Z``).  It is a
    differential entropy of the residual of the best linear prediction of the one-hot label from ``Z``:
    it can be negative, and only differences between feature sets are meaningful.

    Args:
        features: ``(N, ...)`` samples, flattened to ``(N, d)``.
        labels: ``(N,)`` integer class labels, at least two classes.
        method: ``discriminant`` or ``joint``.
        covariance: ``shared`` or ``per_class`` (``discriminant`` only).
        shrinkage: ``'auto'`` or a number in ``[0, 1]``.
        folds: cross-fitting folds (``discriminant``); ``0`` or ``1`` for in-sample.
        calibrate: fit the inverse temperature (``discriminant``); ``False`` scores the raw posterior.
        seed: seed of the fold assignment.
    """
    z = _features_matrix(features)
    y = _check_labels(labels, z.shape[0], "labels")
    shrinkage = _check_shrinkage(shrinkage)
    if method not in ("discriminant", "joint"):
        raise ConfigError(f"method must be 'discriminant' or 'joint', got {method!r}")
    if covariance not in ("shared", "per_class"):
        raise ConfigError(f"covariance must be 'shared' or 'per_class', got {covariance!r}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 0:
        raise ConfigError(f"folds must be an int >= 0 (0 or 1: in-sample), got {folds!r}")
    classes, counts = y.unique(return_counts=True)
    if len(classes) < 2:
        raise ShapeError(f"labels must hold at least 2 classes, got only class {classes.tolist()}")

    if method == "joint":
        onehot = (y[:, None] == classes[None, :]).double()[:, :-1]
        zc, yc = z - z.mean(0), onehot - onehot.mean(0)
        n = z.shape[0]
        Sz, _ = shrunk_covariance(zc, shrinkage)
        Lz, _ = _cholesky_pd(Sz, "feature")
        Syz = yc.T @ zc / (n - 1)
        Sy = yc.T @ yc / (n - 1)
        resid = Sy - Syz @ torch.cholesky_solve(Syz.T, Lz)
        resid = (resid + resid.T) / 2
        sign, logdet = torch.linalg.slogdet(resid)
        if sign <= 0:
            return -math.inf  # the labels are an exact linear function of the features
        return 0.5 * (resid.shape[0] * _LOG_2PI_E + float(logdet))

    if not isinstance(calibrate, bool):
        raise ConfigError(f"calibrate must be a bool, got {calibrate!r}")
    target = torch.searchsorted(classes, y)
    if folds >= 2:
        if int(counts.min()) < folds:
            raise ShapeError(f"folds = {folds} needs at least {folds} samples of every class, class "
                             f"{int(classes[counts.argmin()])} has {int(counts.min())}; lower folds")
        fold = _stratified_folds(y, folds, seed)
        loglik = torch.empty(z.shape[0], len(classes), dtype=torch.float64)
        log_prior = torch.empty_like(loglik)
        for f in range(folds):
            fit, ev = fold != f, fold == f
            loglik[ev], log_prior[ev] = _discriminant_scores(z[fit], y[fit], z[ev], classes, covariance, shrinkage)
    else:
        loglik, log_prior = _discriminant_scores(z, y, z, classes, covariance, shrinkage)
    beta = _fit_inverse_temperature(loglik, log_prior, target) if calibrate else 1.0
    return _cross_entropy(loglik, log_prior, target, beta)


def apply_noise(features: torch.Tensor, noise, *, prefix_tokens: int = 0, grid=None,
                batches: Optional[Sequence[torch.Tensor]] = None, seed: int = 0) -> torch.Tensor:
    """``features`` with ``noise`` applied as the noise layer applies it, regardless of its train/eval
    switches; a batch-axis noise mixes the samples of each of ``batches`` (index tensors; default: one
    batch of all samples).

    Args:
        features: ``(N, T, D)`` tokens or ``(N, C, H, W)`` feature maps.
        noise: a :class:`NoiseConfig`, a dict of its fields or a kind name (validated by NoiseConfig,
            so a batch-axis config that is on at eval needs ``allow_batch_dependence=True``).
        prefix_tokens, grid: as for :func:`~noisynn_kernels.linear_transform_noise`.
        batches: how the samples are grouped for ``axis='batch'``; sample-local noises apply to every
            sample alike and ignore it.
        seed: seed of the random kinds' generator (the config's own ``seed`` wins when set).
    """
    cfg = NoiseConfig.coerce(noise)
    if cfg is None:
        raise ConfigError("noise must be a NoiseConfig, a dict of its fields or a kind name, got None")
    x = _functional.check_activation(features, "features")
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed if cfg.seed is not None else int(seed))

    def one(t):
        if cfg.is_linear:
            return _functional.linear_transform_noise(
                t, cfg.kind, axis=cfg.axis, alpha=cfg.alpha, matrix=cfg.matrix, prefix_tokens=prefix_tokens,
                grid=grid, straight_through=cfg.straight_through, check=cfg.check_matrix)
        if cfg.kind == "gaussian":
            return _functional.gaussian_noise(t, std=cfg.std, mean=cfg.mean, strength=cfg.strength,
                                              prefix_tokens=prefix_tokens, generator=gen)
        return _functional.salt_and_pepper_noise(t, cfg.p, low=cfg.low, high=cfg.high, prefix_tokens=prefix_tokens,
                                                 generator=gen)

    if batches is None:
        return one(x)
    out = torch.empty_like(x)
    covered = torch.zeros(x.shape[0], dtype=torch.bool)
    for idx in batches:
        idx = torch.as_tensor(idx, dtype=torch.long)
        out[idx.to(x.device)] = one(x[idx.to(x.device)])
        covered[idx] = True
    if not bool(covered.all()):
        raise ConfigError(f"batches must cover every one of the {x.shape[0]} samples, "
                          f"{int((~covered).sum())} were left out")
    return out


@dataclass
class EntropyDiagnostics:
    """Entropy estimates of one features tensor before and after one noise (:func:`entropy_diagnostics`).

    Attributes:
        noise: the NoiseConfig as a dict.
        ordering, batch_size: how samples were grouped for a batch-axis noise (``None`` otherwise).
        k: rows mixed by the linear noise (the batch size for ``axis='batch'``); ``None`` for random noise.
        delta_S: the paper's entropy change ``-ln|det(I+Q)|`` for ``k`` rows; ``None`` for random noise.
        H_Y: label entropy (nats).
        H_Z_before, H_Z_after: Gaussian feature entropy (nats, :func:`gaussian_entropy`).
        expected_H_Z_change: for sample-local linear noise, the exact change of ``H_Z`` implied by
            ``delta_S`` (``-(mixed features / k) * delta_S``, exact when ``shrinkage=0``); else ``None``.
        H_Y_given_Z_before, H_Y_given_Z_after: :func:`conditional_entropy_gaussian` (nats).
        method, shrinkage, folds: the estimator's settings.
    """

    noise: dict
    ordering: Optional[str]
    batch_size: Optional[int]
    k: Optional[int]
    delta_S: Optional[float]
    H_Y: float
    H_Z_before: float
    H_Z_after: float
    expected_H_Z_change: Optional[float]
    H_Y_given_Z_before: float
    H_Y_given_Z_after: float
    method: str
    shrinkage: Union[float, str]
    folds: int

    @property
    def H_Y_given_Z_change(self) -> float:
        """``H(Y|Z)`` after minus before: negative means the noise made the labels easier to read."""
        return self.H_Y_given_Z_after - self.H_Y_given_Z_before

    def to_dict(self) -> dict:
        """Plain-data form for JSON, with ``H_Y_given_Z_change``."""
        d = asdict(self)
        d["H_Y_given_Z_change"] = self.H_Y_given_Z_change
        return d


def entropy_diagnostics(features: torch.Tensor, labels, noise, *, prefix_tokens: int = 0, grid=None,
                        ordering: str = "shuffled", batch_size: int = 10, seed: int = 0,
                        method: str = "discriminant", covariance: str = "shared",
                        shrinkage: Union[float, str] = "auto", folds: int = 5,
                        before: Optional[Tuple[float, float]] = None) -> EntropyDiagnostics:
    """``H(Z)`` and ``H(Y|Z)`` of ``features`` before and after ``noise``, next to the paper's ``dS``.

    In exact arithmetic an invertible sample-local ``(I+Q)`` changes ``H(Z)`` by ``-(d/k) dS`` and leaves
    ``H(Y|Z)`` unchanged: the paper's "entropy change" is not information about the labels.  Batch-axis
    mixing is not a per-sample map: it writes other samples' features into each sample, and with
    class-``sorted`` batches (the official protocol) those are same-label samples, so ``H(Y|Z)`` drops.
    Random noise can only destroy label information (data processing), so ``H(Y|Z)`` rises.

    Args:
        features: ``(N, T, D)`` tokens or ``(N, C, H, W)`` feature maps.
        labels: ``(N,)`` integer labels.
        noise: NoiseConfig / dict / kind name (validated by NoiseConfig).
        prefix_tokens, grid: token geometry for the noise (prefix tokens are never mixed).
        ordering, batch_size, seed: how samples are grouped into batches for ``axis='batch'``
            (:func:`ordering_batches`); ``seed`` also seeds the random kinds and the folds.
        method, covariance, shrinkage, folds: passed to :func:`conditional_entropy_gaussian`;
            ``shrinkage`` also to :func:`gaussian_entropy`.
        before: ``(H_Z, H_Y_given_Z)`` of the unchanged ``features`` with these same settings, when already
            known (e.g. from an earlier call's ``H_Z_before``, ``H_Y_given_Z_before``): skips recomputing them.
    """
    cfg = NoiseConfig.coerce(noise)
    if cfg is None:
        raise ConfigError("noise must be a NoiseConfig, a dict of its fields or a kind name, got None")
    x = _functional.check_activation(features, "features")
    y = _check_labels(labels, x.shape[0], "labels")
    batches = None
    k = delta_S = expected = None
    if cfg.is_linear and cfg.mixes_batch:
        batches = ordering_batches(x.shape[0], ordering, batch_size, y, seed)
        k = batch_size if ordering != "single" else 1
    elif cfg.is_linear:
        k = _functional.mixed_size(x, cfg.axis, prefix_tokens, grid)
    after = apply_noise(x, cfg, prefix_tokens=prefix_tokens, grid=grid, batches=batches, seed=seed)
    if cfg.is_linear:
        M = quality.mixing_matrix(cfg.kind, k, cfg.alpha, cfg.matrix)
        delta_S = entropy_change(M)
        if not cfg.mixes_batch and math.isfinite(delta_S):
            mixed = x[0].numel() - (prefix_tokens * x.shape[-1] if x.dim() == 3 else 0)
            expected = -(mixed / k) * delta_S
    kw = dict(method=method, covariance=covariance, shrinkage=shrinkage, folds=folds, seed=seed)
    if before is None:
        before = (gaussian_entropy(x, shrinkage=shrinkage), conditional_entropy_gaussian(x, y, **kw))
    return EntropyDiagnostics(
        noise=cfg.to_dict(), ordering=ordering if batches is not None else None,
        batch_size=batch_size if batches is not None else None, k=k, delta_S=delta_S, H_Y=label_entropy(y),
        H_Z_before=float(before[0]), H_Z_after=gaussian_entropy(after, shrinkage=shrinkage),
        expected_H_Z_change=expected,
        H_Y_given_Z_before=float(before[1]),
        H_Y_given_Z_after=conditional_entropy_gaussian(after, y, **kw),
        method=method, shrinkage=shrinkage, folds=folds)


# --------------------------------------------------------------------------------------------------
# training and layer sensitivity
# --------------------------------------------------------------------------------------------------
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
        _positive_int("epochs", self.epochs, minimum=0)
        _positive_int("batch_size", self.batch_size)
        for name, lo, hi in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf), ("warmup", 0.0, 1.0),
                             ("label_smoothing", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number in [{lo}, {hi}], got {v!r}")


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings = TrainSettings(),
                     *, seed: int = 0, device=None,
                     on_epoch: Optional[Callable[[int, float], None]] = None) -> List[float]:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy; returns the mean loss of every epoch.

    The batch order comes from ``torch.Generator().manual_seed(seed)``; the global RNG is seeded with
    ``seed`` too, so random noise draws are reproducible.  The model is left in eval mode.
    ``on_epoch(epoch, mean_loss)`` is called after every epoch.
    """
    _check_model(model)
    x = _check_data(x, "x")
    y = _check_labels(y, x.shape[0], "y")
    if not isinstance(settings, TrainSettings):
        raise ConfigError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    dev, dtype = _model_device_dtype(model, device)
    losses: List[float] = []
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
            loss = F.cross_entropy(model(_as_input(x[idx], dev, dtype)), y_dev[idx.to(dev)],
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
    x = _check_data(x, "x")
    y = _check_labels(y, x.shape[0], "y")
    _check_noise_guard(_check_model(model))
    was_training = model.training
    model.eval()
    try:
        logits = predict(model, x, ordering_batches(x.shape[0], ordering, batch_size, y, seed), device=device)
    finally:
        model.train(was_training)
    return float((logits.argmax(-1) == y).double().mean())


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
    layers: List[int]
    accuracy: Dict[str, List[float]]
    final_loss: List[float]
    baseline_accuracy: Dict[str, float]
    settings: dict
    seed: int

    def to_dict(self) -> dict:
        """Plain-data form for JSON."""
        return asdict(self)


def layer_sensitivity(model_factory: Callable[[], nn.Module], noise, train_data: Tuple[torch.Tensor, torch.Tensor],
                      test_data: Tuple[torch.Tensor, torch.Tensor], *, layers: Optional[Sequence[int]] = None,
                      settings: TrainSettings = TrainSettings(), seed: int = 0, eval_batch_size: int = 10,
                      orderings: Sequence[str] = ("shuffled",), baseline: bool = False, device=None,
                      on_run: Optional[Callable[[str], None]] = None) -> LayerSensitivity:
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
        train_data, test_data: ``(x, y)`` pairs.
        layers: block indices to try (negative counts from the end).
        baseline: also run without noise (``baseline_accuracy``).
        on_run: called with a short description before each run (progress display).
    """
    from .models.patch import apply_noisynn, model_blocks, remove_noisynn

    cfg = NoiseConfig.coerce(noise)
    if cfg is None:
        raise ConfigError("noise must be a NoiseConfig, a dict of its fields or a kind name, got None")
    if not callable(model_factory):
        raise ConfigError(f"model_factory must be a zero-argument callable returning a model, "
                          f"got {type(model_factory).__name__}")
    (xtr, ytr), (xte, yte) = train_data, test_data
    if isinstance(orderings, str):
        orderings = (orderings,)
    orderings = tuple(orderings)
    if not orderings or any(o not in ORDERINGS for o in orderings):
        raise ConfigError(f"orderings must be names from {ORDERINGS}, got {orderings!r}")

    def fresh():
        torch.manual_seed(seed)
        m = _check_model(model_factory())
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

    accuracy: Dict[str, List[float]] = {o: [] for o in orderings}
    final_loss: List[float] = []
    base: Dict[str, float] = {}
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
