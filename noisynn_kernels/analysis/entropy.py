"""Gaussian entropy estimates of features before and after a noise, next to the paper's entropy change.

:func:`gaussian_entropy`, :func:`conditional_entropy_gaussian` and :func:`entropy_diagnostics`
estimate ``H(Z)`` and ``H(Y|Z)`` of a features tensor under Gaussian assumptions, before and after a
noise (:func:`apply_noise`), next to the paper's entropy change ``dS = -log|det(I+Q)|``
(:func:`entropy_change`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..config import NoiseConfig
from ..errors import ConfigError, ShapeError
from ..functional import check_activation, gaussian_noise, linear_transform_noise, mixed_size, salt_and_pepper_noise
from ..quality import entropy_change, mixing_matrix
from ._checks import check_data, check_labels
from .batch import ordering_batches
from .data import SampleSource, as_source

__all__ = ["entropy_change", "label_entropy", "gaussian_entropy", "shrunk_covariance", "conditional_entropy_gaussian",
           "apply_noise", "EntropyDiagnostics", "entropy_diagnostics"]

_LOG_2PI_E = math.log(2 * math.pi * math.e)


def _in_memory(features, labels=None, name: str = "features"):
    """``(features, labels)`` with a ``Dataset`` / ``DataLoader`` of ``(input, label)`` pairs loaded into one
    tensor (the covariance estimators need every sample at once) and its labels used when ``labels`` is
    ``None``; a tensor passes through unchanged."""
    if isinstance(features, torch.Tensor):
        return features, labels
    if isinstance(features, (torch.utils.data.Dataset, torch.utils.data.DataLoader, SampleSource)):
        src = as_source(features, labels, name=name)
        return src.tensor(), (src.read_targets() if labels is None else src.targets)
    return features, labels


def _features_matrix(features, name: str = "features") -> torch.Tensor:
    features = check_data(_in_memory(features, name=name)[0], name)
    if not (features.is_floating_point() or features.dtype in (torch.int8, torch.int16, torch.int32,
                                                                   torch.int64, torch.uint8)):
        raise ShapeError(f"{name} must be a real tensor, got dtype {features.dtype}")
    z = features.detach().to("cpu", torch.float64).reshape(features.shape[0], -1)
    if not torch.isfinite(z).all():
        raise ShapeError(f"{name} has non-finite entries; expected finite features")
    return z


def _check_shrinkage(shrinkage) -> float | str:
    if shrinkage == "auto":
        return shrinkage
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"shrinkage must be a number in [0, 1] or 'auto' (Ledoit-Wolf), got {shrinkage!r}")
    return float(shrinkage)


def shrunk_covariance(centered: torch.Tensor, shrinkage: float | str = 0.0, *,
                      dof: int | None = None) -> tuple[torch.Tensor, float]:
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


def _cholesky_pd(S: torch.Tensor, what: str) -> tuple[torch.Tensor, float]:
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
    labels = check_labels(labels, len(labels), "labels")
    counts = torch.bincount(labels - labels.min()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def gaussian_entropy(features: torch.Tensor, *, shrinkage: float | str = 0.0) -> float:
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
                                 covariance: str = "shared", shrinkage: float | str = "auto",
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
        features: ``(N, ...)`` samples, flattened to ``(N, d)``, or a ``Dataset`` / ``DataLoader`` of
            ``(features, label)`` pairs (loaded whole).
        labels: ``(N,)`` integer class labels, at least two classes (``None``: the dataset's).
        method: ``discriminant`` or ``joint``.
        covariance: ``shared`` or ``per_class`` (``discriminant`` only).
        shrinkage: ``'auto'`` or a number in ``[0, 1]``.
        folds: cross-fitting folds (``discriminant``); ``0`` or ``1`` for in-sample.
        calibrate: fit the inverse temperature (``discriminant``); ``False`` scores the raw posterior.
        seed: seed of the fold assignment.
    """
    features, labels = _in_memory(features, labels)
    z = _features_matrix(features)
    y = check_labels(labels, z.shape[0], "labels")
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
                batches: Sequence[torch.Tensor] | None = None, seed: int = 0) -> torch.Tensor:
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
    x = check_activation(features, "features")
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed if cfg.seed is not None else int(seed))

    def one(t):
        if cfg.is_linear:
            return linear_transform_noise(
                t, cfg.kind, axis=cfg.axis, alpha=cfg.alpha, matrix=cfg.matrix, prefix_tokens=prefix_tokens,
                grid=grid, straight_through=cfg.straight_through, check=cfg.check_matrix, shift=cfg.shift)
        if cfg.kind == "gaussian":
            return gaussian_noise(t, std=cfg.std, mean=cfg.mean, strength=cfg.strength,
                                              prefix_tokens=prefix_tokens, generator=gen)
        return salt_and_pepper_noise(t, cfg.p, low=cfg.low, high=cfg.high, value_range=cfg.value_range,
                                     prefix_tokens=prefix_tokens, generator=gen)

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
    ordering: str | None
    batch_size: int | None
    k: int | None
    delta_S: float | None
    H_Y: float
    H_Z_before: float
    H_Z_after: float
    expected_H_Z_change: float | None
    H_Y_given_Z_before: float
    H_Y_given_Z_after: float
    method: str
    shrinkage: float | str
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
                        shrinkage: float | str = "auto", folds: int = 5,
                        before: tuple[float, float] | None = None) -> EntropyDiagnostics:
    """``H(Z)`` and ``H(Y|Z)`` of ``features`` before and after ``noise``, next to the paper's ``dS``.

    In exact arithmetic an invertible sample-local ``(I+Q)`` changes ``H(Z)`` by ``-(d/k) dS`` and leaves
    ``H(Y|Z)`` unchanged: the paper's "entropy change" is not information about the labels.  Batch-axis
    mixing is not a per-sample map: it writes other samples' features into each sample, and with
    class-``sorted`` batches (the official protocol) those are same-label samples, so ``H(Y|Z)`` drops.
    Random noise can only destroy label information (data processing), so ``H(Y|Z)`` rises.

    Args:
        features: ``(N, T, D)`` tokens or ``(N, C, H, W)`` feature maps, or a ``Dataset`` / ``DataLoader`` of
            ``(features, label)`` pairs (loaded whole: the estimators need every sample).
        labels: ``(N,)`` integer labels (``None``: the dataset's).
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
    features, labels = _in_memory(features, labels)
    x = check_activation(features, "features")
    y = check_labels(labels, x.shape[0], "labels")
    batches = None
    k = delta_S = expected = None
    if cfg.is_linear and cfg.mixes_batch:
        batches = ordering_batches(x.shape[0], ordering, batch_size, y, seed)
        k = batch_size if ordering != "single" else 1
    elif cfg.is_linear:
        k = mixed_size(x, cfg.axis, prefix_tokens, grid)
    after = apply_noise(x, cfg, prefix_tokens=prefix_tokens, grid=grid, batches=batches, seed=seed)
    if cfg.is_linear:
        M = mixing_matrix(cfg.kind, k, cfg.alpha, cfg.matrix, shift=cfg.shift)
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
