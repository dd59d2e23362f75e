"""``noisynn audit``: does NoisyNN's gain survive when a prediction may not look at its batch mates?

A small real-data experiment, run end to end on a CPU in minutes with nothing downloaded: the 1,797
8 x 8 handwritten digits that ship with scikit-learn (``sklearn.datasets.load_digits``), a small
NoisyViT (timm ``VisionTransformer``: 8 x 8 input, 2 x 2 patches, width 64, 4 blocks, 4 heads) trained
from scratch under each noise condition, for several seeds, and every trained model evaluated under
three batch orderings: class-sorted batches of 10 (the official NoisyViT test loader), shuffled batches
of 10, and batch size 1 (:func:`noisynn_kernels.analysis.batch_dependence`).

Conditions: no noise; ``optimal`` and ``shift`` linear noise on the ``tokens`` and on the ``rows`` axis
at the input of the last block (sample-local, on in training and evaluation); the official ViT
protocol (``optimal`` across the *batch* on the LayerNorm-1 output of the last block, off in training
and on at evaluation: the no-noise model with the noise switched on for evaluation); Gaussian and
salt-and-pepper noise at the input of the last block with the official defaults.  Plus: the official
protocol's accuracy as a function of the evaluation batch size, layer sensitivity (the noise at each
block in turn), and Gaussian entropy estimates of the inputs and of the last block's input features
before and after every noise (:func:`noisynn_kernels.analysis.entropy_diagnostics`).

The official condition mixes the batch at inference.  :func:`conditions` builds it only with an
explicit ``allow_batch_dependence=True`` (otherwise :class:`~noisynn_kernels.BatchDependenceError`);
:func:`run` passes it because measuring that protocol is what the audit is for, and the report labels
the condition as batch-dependent.

:func:`run` writes ``report.md``, ``audit.json`` and PNG plots into the output directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import analysis
from ._progress import Progress
from .bench.environment import environment
from .config import NoiseConfig
from .errors import ConfigError
from .models import apply_noisynn, model_blocks

__all__ = ["AuditOptions", "MODEL", "load_digits_split", "make_model", "conditions", "run", "write_report",
           "write_plots", "FolderAuditOptions", "run_folder", "write_folder_report", "write_folder_plots"]

#: The model of the experiment: keyword arguments of ``timm.create_model``.
MODEL: dict[str, Any] = dict(model_name="noisy_vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1,
                             embed_dim=64, depth=4, num_heads=4, num_classes=10)

#: Orderings every model is evaluated under.
ORDERINGS = ("sorted", "shuffled", "single")

_DEFAULT_SEEDS, _DEFAULT_EPOCHS = 3, 12
_FAST_SEEDS, _FAST_EPOCHS = 1, 2


@dataclass
class AuditOptions:
    """What ``noisynn audit`` runs (the CLI flags map one to one).

    Attributes:
        out: output directory (created).
        seeds: number of seeds (0, 1, ...): model initialisation and training batch order; the data
            split is fixed.  ``None``: 3, or 1 with ``fast``.
        epochs: training epochs of every run.  ``None``: 12, or 2 with ``fast``.
        fast: a smoke-test run (1 seed, 2 epochs, 300 training and 100 test images, fewer batch sizes,
            2-fold entropy estimates):
            well under a minute, numbers not meaningful.
        quiet: no progress display on stderr.
        eval_batch_size: batch size of the sorted and shuffled orderings (the official loader uses 10).
        batch_sizes: evaluation batch sizes of the official-protocol sweep.
        layer_sensitivity: run the per-block experiments.
        threads: ``torch.set_num_threads`` for the run (restored afterwards); ``None`` leaves torch's
            setting.  Default 1: the model is too small for intra-op parallelism to pay, and a single
            thread does not collapse when other processes share the cores (two spinning OpenMP threads
            on a busy 2-core machine ran the same epoch 10-20x slower).
        test_fraction: stratified held-out fraction of the digits.
        max_train, max_test: use a stratified subset of at most this many training / test images
            (``None``: all; ``fast`` defaults to 300 / 100).
        entropy_folds: cross-fitting folds of the H(Y|Z) estimates (``None``: 5, or 2 with ``fast``).
        train: the TrainSettings of every run (its ``epochs`` is replaced by ``epochs``).
    """

    out: str = "audit-results"
    seeds: int | None = None
    epochs: int | None = None
    fast: bool = False
    quiet: bool = False
    eval_batch_size: int = 10
    batch_sizes: tuple[int, ...] | None = None
    layer_sensitivity: bool = True
    threads: int | None = 1
    test_fraction: float = 0.2
    max_train: int | None = None
    max_test: int | None = None
    entropy_folds: int | None = None
    train: analysis.TrainSettings = field(default_factory=analysis.TrainSettings)

    def resolved(self) -> AuditOptions:
        """A copy with the ``None`` defaults filled in for ``fast`` or the full run, checked."""
        seeds = self.seeds if self.seeds is not None else (_FAST_SEEDS if self.fast else _DEFAULT_SEEDS)
        epochs = self.epochs if self.epochs is not None else (_FAST_EPOCHS if self.fast else _DEFAULT_EPOCHS)
        sizes = self.batch_sizes if self.batch_sizes is not None else ((2, 10, 50) if self.fast else (2, 5, 10, 20, 50))
        for name, value, lo in (("seeds", seeds, 1), ("epochs", epochs, 0),
                                ("eval_batch_size", self.eval_batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {value!r}")
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ConfigError(f"batch_sizes must be ints >= 1, got {sizes!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"threads must be an int >= 1 or None, got {self.threads!r}")
        max_train = self.max_train if self.max_train is not None or not self.fast else 300
        max_test = self.max_test if self.max_test is not None or not self.fast else 100
        folds = self.entropy_folds if self.entropy_folds is not None else (2 if self.fast else 5)
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ConfigError(f"entropy_folds must be an int >= 2, got {folds!r}")
        for name, value in (("max_train", max_train), ("max_test", max_test)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 20):
                raise ConfigError(f"{name} must be an int >= 20 or None, got {value!r}")
        if not 0.05 <= self.test_fraction <= 0.5:
            raise ConfigError(f"test_fraction must be in [0.05, 0.5], got {self.test_fraction!r}")
        return AuditOptions(out=self.out, seeds=seeds, epochs=epochs, fast=self.fast, quiet=self.quiet,
                            eval_batch_size=self.eval_batch_size, batch_sizes=tuple(sizes),
                            layer_sensitivity=self.layer_sensitivity, threads=self.threads,
                            test_fraction=self.test_fraction, max_train=max_train, max_test=max_test,
                            entropy_folds=folds,
                            train=analysis.TrainSettings(**{**asdict(self.train), "epochs": epochs}))


# --------------------------------------------------------------------------------------------------
# data, model, conditions
# --------------------------------------------------------------------------------------------------
def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 8 x 8 digits as ``((x_train, y_train), (x_test, y_test))``: images ``(N, 1, 8, 8)``
    float32 standardised with the training set's pixel mean and standard deviation, labels ``int64``;
    a stratified split (every class split in the same proportion) drawn with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn comes with the [test] and [bench] extras
        raise ImportError("the audit needs scikit-learn for its data set (sklearn.datasets.load_digits, shipped "
                          "with the package, no download): pip install scikit-learn") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[:round(test_fraction * len(idx))]] = True
    mean, std = x[~test].mean(), x[~test].std()
    x = (x - mean) / std
    return (x[~test], y[~test]), (x[test], y[test])


def _stratified_subset(x: torch.Tensor, y: torch.Tensor, n: int | None):
    """At most ``n`` samples, every class in its original proportion (the first ones: the split is random)."""
    if n is None or n >= len(y):
        return x, y
    keep = torch.cat([(y == c).nonzero().flatten()[:max(1, round(n * int((y == c).sum()) / len(y)))]
                      for c in y.unique()])
    keep = keep.sort().values
    return x[keep], y[keep]


def make_model(noise: Any = False):
    """A fresh :data:`MODEL` with ``noise`` (a NoiseConfig, dict, kind name, or ``False`` for none)."""
    import timm

    from . import models  # noqa: F401  (registers the noisy_* names with timm)

    kw = dict(MODEL)
    name = kw.pop("model_name")
    return timm.create_model(name, noise=noise, **kw)


def conditions(*, allow_batch_dependence: bool = False,
               include_official: bool = True) -> dict[str, NoiseConfig | None]:
    """The noise conditions of the experiment, name -> NoiseConfig (``None``: no noise).

    ``official`` (optimal Q across the batch at inference, :meth:`NoiseConfig.official_vit`) and
    ``salt_and_pepper/batch`` (salt-and-pepper to the batch's max / min, the official latent-level rule) make
    predictions depend on the batch: they are built only with ``allow_batch_dependence=True`` and raise
    :class:`~noisynn_kernels.BatchDependenceError` otherwise; ``include_official=False`` leaves them out.
    """
    conds: dict[str, NoiseConfig | None] = {
        "none": None,
        "optimal/tokens": NoiseConfig(kind="optimal", axis="tokens"),
        "optimal/rows": NoiseConfig(kind="optimal", axis="rows"),
        "shift/tokens": NoiseConfig(kind="shift", axis="tokens", alpha=0.3),
        "shift/rows": NoiseConfig(kind="shift", axis="rows", alpha=0.3),
    }
    if include_official:
        conds["official"] = NoiseConfig.official_vit(allow_batch_dependence=allow_batch_dependence)
    conds["gaussian"] = NoiseConfig(kind="gaussian", strength=0.1, std=1.0)
    conds["salt_and_pepper"] = NoiseConfig(kind="salt_and_pepper", p=0.1)
    if include_official:
        conds["salt_and_pepper/batch"] = NoiseConfig(kind="salt_and_pepper", p=0.1, value_range="batch",
                                                     allow_batch_dependence=allow_batch_dependence)
    return conds


_DESCRIPTIONS = {
    "none": "no noise",
    "optimal/tokens": "optimal Q over the 16 patch tokens, last block input, train + eval",
    "optimal/rows": "optimal Q over the 4 patch-grid rows, last block input, train + eval",
    "shift/tokens": "shift Q (a = 0.3) over the 16 patch tokens, last block input, train + eval",
    "shift/rows": "shift Q (a = 0.3) over the 4 patch-grid rows, last block input, train + eval",
    "official": "official ViT protocol: optimal Q across the batch on LN-1 output of the last block, "
                "eval only (no-noise weights); batch-dependent, explicit opt-in",
    "gaussian": "x + 0.1 N(0, 1), last block input (class token untouched), train + eval",
    "salt_and_pepper": "p = 0.1 to each sample's own max / min (the default range), last block input (class token "
                       "untouched), train + eval",
    "salt_and_pepper/batch": "p = 0.1 to the whole batch's max / min (the official latent-level rule, "
                             "value_range='batch'), last block input, train + eval; batch-dependent, explicit opt-in",
}


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
def _environment() -> dict[str, Any]:
    env = dict(environment(torch.device("cpu")))
    env["threads"] = torch.get_num_threads()
    try:
        import sklearn

        env["scikit-learn"] = sklearn.__version__
    except ImportError:
        env["scikit-learn"] = "not installed"
    return env


def _block_input_features(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The residual stream entering the last block (where the sample-local noises sit), ``(N, T, D)``."""
    captured: list[torch.Tensor] = []
    handle = model_blocks(model)[-1].register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in torch.split(x, batch_size):
                model(chunk)
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(captured)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _entropy_rows(x: torch.Tensor, y: torch.Tensor, *, prefix_tokens: int, grid, eval_batch_size: int,
                  seed: int, folds: int) -> list[dict]:
    # Only the noises' own parameters matter here (apply_noise ignores the train/eval switches); the
    # batch-axis configs still carry the explicit opt-in, as any batch-mixing config on at eval must.
    batch = NoiseConfig(kind="optimal", axis="batch", allow_batch_dependence=True)
    noises = [("optimal/tokens", NoiseConfig(kind="optimal", axis="tokens"), None),
              ("optimal/rows", NoiseConfig(kind="optimal", axis="rows"), None),
              ("shift/tokens", NoiseConfig(kind="shift", axis="tokens", alpha=0.3), None),
              ("shift/rows", NoiseConfig(kind="shift", axis="rows", alpha=0.3), None),
              ("optimal/batch, sorted", batch, "sorted"),
              ("optimal/batch, shuffled", batch, "shuffled"),
              ("gaussian", NoiseConfig(kind="gaussian", strength=0.1), None),
              ("salt_and_pepper", NoiseConfig(kind="salt_and_pepper", p=0.1), None)]
    rows, before = [], None
    for name, cfg, ordering in noises:
        d = analysis.entropy_diagnostics(x, y, cfg, prefix_tokens=prefix_tokens, grid=grid,
                                         ordering=ordering or "shuffled", batch_size=eval_batch_size, seed=seed,
                                         folds=folds, before=before)
        before = (d.H_Z_before, d.H_Y_given_Z_before)
        rows.append({"name": name, **d.to_dict()})
    return rows


def run(opts: AuditOptions | None = None) -> dict:
    """Run the audit with ``opts`` (default: ``AuditOptions()``); returns the result dict (also written
    to ``<out>/audit.json``), with ``paths``."""
    opts = (AuditOptions() if opts is None else opts).resolved()
    threads_before = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        return _run(opts)
    finally:
        torch.set_num_threads(threads_before)


def _run(opts: AuditOptions) -> dict:
    t_start = time.perf_counter()
    os.makedirs(opts.out, exist_ok=True)
    (xtr, ytr), (xte, yte) = load_digits_split(opts.test_fraction)
    xtr, ytr = _stratified_subset(xtr, ytr, opts.max_train)
    xte, yte = _stratified_subset(xte, yte, opts.max_test)
    conds = conditions(allow_batch_dependence=True)  # explicit: the audit measures the official protocol
    seeds = list(range(opts.seeds))
    n_blocks = MODEL["depth"]
    trained = [c for c, cfg in conds.items() if cfg is None or cfg.train]
    per_seed_tasks = len(trained) + (len(conds) - len(trained)) + 1 + (n_blocks if opts.layer_sensitivity else 0)
    progress = Progress(per_seed_tasks * len(seeds) + 2, opts.quiet, width=3)
    progress.note(f"digits: {len(ytr)} train / {len(yte)} test images; {len(seeds)} seed(s) x "
                  f"{opts.epochs} epochs; {torch.get_num_threads()} threads; output {opts.out}")

    per_condition: dict[str, dict[str, Any]] = {
        name: {"config": None if cfg is None else cfg.to_dict(), "description": _DESCRIPTIONS[name],
               "trained_with_noise": cfg is not None and cfg.train, "seeds": []} for name, cfg in conds.items()}
    sweep: dict[str, dict[str, dict[int, list[float]]]] = {
        c: {o: {b: [] for b in opts.batch_sizes} for o in ("sorted", "shuffled")} for c in ("official", "none")}
    layers: dict[str, list[dict]] = {"optimal/tokens": [], "official": []}
    baseline_models = {}

    for seed in seeds:
        for name, cfg in conds.items():
            if cfg is not None and not cfg.train:
                continue  # eval-only noise: evaluated on the no-noise weights below
            torch.manual_seed(seed)
            model = make_model(cfg if cfg is not None else False)
            t0 = time.perf_counter()
            losses = analysis.train_classifier(model, xtr, ytr, opts.train, seed=seed)
            train_s = time.perf_counter() - t0
            dep = analysis.batch_dependence(model, xte, yte, batch_size=opts.eval_batch_size, orderings=ORDERINGS,
                                            seed=seed)
            per_condition[name]["seeds"].append({"seed": seed, "train_loss": losses, "train_seconds": train_s,
                                                 **dep.to_dict()})
            progress(f"seed {seed} {name:<16} trained {train_s:5.1f}s  acc sorted/shuffled/single "
                     + "/".join(f"{100 * dep.accuracy[o]:.1f}" for o in ORDERINGS))
            if cfg is None:
                baseline_models[seed] = model
        base = baseline_models[seed]
        for name, cfg in conds.items():
            if cfg is None or cfg.train:
                continue
            model = apply_noisynn(copy.deepcopy(base), cfg)
            dep = analysis.batch_dependence(model, xte, yte, batch_size=opts.eval_batch_size, orderings=ORDERINGS,
                                            seed=seed)
            per_condition[name]["seeds"].append({"seed": seed, "train_loss": per_condition["none"]["seeds"][-1]
                                                 ["train_loss"], "train_seconds": 0.0, **dep.to_dict()})
            progress(f"seed {seed} {name:<16} (no-noise weights)  acc sorted/shuffled/single "
                     + "/".join(f"{100 * dep.accuracy[o]:.1f}" for o in ORDERINGS))
        official_model = apply_noisynn(copy.deepcopy(base), conds["official"])
        for cname, m in (("official", official_model), ("none", base)):
            for o in ("sorted", "shuffled"):
                for b in opts.batch_sizes:
                    sweep[cname][o][b].append(analysis.evaluate_accuracy(m, xte, yte, batch_size=b, ordering=o,
                                                                         seed=seed))
        progress(f"seed {seed} official protocol vs eval batch size {list(opts.batch_sizes)}")
        if opts.layer_sensitivity:
            # The last block is the optimal/tokens condition above (same config, same seed: the same run).
            ls = analysis.layer_sensitivity(lambda: make_model(False), conds["optimal/tokens"], (xtr, ytr),
                                            (xte, yte), layers=range(n_blocks - 1), settings=opts.train, seed=seed,
                                            eval_batch_size=opts.eval_batch_size, orderings=("shuffled",),
                                            on_run=lambda what, seed=seed: progress(
                                                f"seed {seed} layer sensitivity: {what}"))
            ls = ls.to_dict()
            last = per_condition["optimal/tokens"]["seeds"][-1]
            ls["layers"].append(n_blocks - 1)
            ls["accuracy"]["shuffled"].append(last["accuracy"]["shuffled"])
            ls["final_loss"].append(last["train_loss"][-1] if last["train_loss"] else math.nan)
            ls["reused"] = {str(n_blocks - 1): "the optimal/tokens condition's run (same config and seed)"}
            layers["optimal/tokens"].append(ls)
            # Eval-only noise: the no-noise weights with the noise moved between blocks.  Batch size 1 is
            # left out: a batch-axis mix of one sample is the identity (the no-noise accuracy).
            ls = analysis.layer_sensitivity(lambda base=base: copy.deepcopy(base), conds["official"], (xtr, ytr),
                                            (xte, yte),
                                            settings=analysis.TrainSettings(**{**asdict(opts.train), "epochs": 0}),
                                            seed=seed, eval_batch_size=opts.eval_batch_size,
                                            orderings=("sorted", "shuffled"))
            layers["official"].append(ls.to_dict())
            progress(f"seed {seed} layer sensitivity: official protocol at each block (no-noise weights)")

    # Entropy diagnostics: all images (training and test), and the residual stream entering the last block of the
    # seed-0 no-noise model on every image (where the sample-local noises of the experiment sit).
    x_all, y_all = torch.cat([xtr, xte]), torch.cat([ytr, yte])
    entropy = {"images": _entropy_rows(x_all, y_all, prefix_tokens=0, grid=None,
                                       eval_batch_size=opts.eval_batch_size, seed=0, folds=opts.entropy_folds)}
    progress("entropy diagnostics: images (N, 1, 8, 8)")
    feats = _block_input_features(baseline_models[seeds[0]], x_all)
    entropy["last_block_input"] = _entropy_rows(feats, y_all, prefix_tokens=1, grid=(4, 4),
                                                eval_batch_size=opts.eval_batch_size, seed=0,
                                                folds=opts.entropy_folds)
    entropy["shapes"] = {"images": list(x_all.shape), "last_block_input": list(feats.shape)}
    progress(f"entropy diagnostics: last block input {tuple(feats.shape)} (seed-0 no-noise model)")

    summary = {}
    for name, entry in per_condition.items():
        rs = entry["seeds"]
        summary[name] = {
            "accuracy": {o: _mean_std([r["accuracy"][o] for r in rs]) for o in ORDERINGS},
            "sorted_minus_shuffled": _mean_std([r["accuracy"]["sorted"] - r["accuracy"]["shuffled"] for r in rs]),
            "sorted_minus_single": _mean_std([r["accuracy"]["sorted"] - r["accuracy"]["single"] for r in rs]),
            "max_logit_diff": max(r["max_logit_diff"] for r in rs),
            "max_prob_diff": max(r["max_prob_diff"] for r in rs),
            "n_argmax_changed": _mean_std([r["n_argmax_changed"] for r in rs]),
            "floor_max_logit_diff": max(r["floor"]["max_logit_diff"] for r in rs),
            "floor_n_argmax_changed": _mean_std([r["floor"]["n_argmax_changed"] for r in rs]),
            "tolerance": max(r["tolerance"] for r in rs),
            "stochastic": any(r["stochastic"] for r in rs),
            "batch_dependent": (None if any(r["batch_dependent"] is None for r in rs)
                                else any(r["batch_dependent"] for r in rs)),
            "paired_max_logit_diff": (None if any(r.get("paired") is None for r in rs)
                                      else max(r["paired"]["max_logit_diff"] for r in rs)),
            "final_train_loss": _mean_std([r["train_loss"][-1] if r["train_loss"] else math.nan for r in rs]),
        }
    result = {
        "environment": _environment(),
        "options": {**{k: v for k, v in asdict(opts).items() if k != "train"}, "train": asdict(opts.train),
                    "seeds": seeds},
        "model": {**MODEL, "parameters": sum(p.numel() for p in make_model(False).parameters())},
        "data": {"name": "sklearn.datasets.load_digits", "train": len(ytr), "test": len(yte),
                 "test_per_class": torch.bincount(yte).tolist(), "split_seed": 0,
                 "test_fraction": opts.test_fraction},
        "orderings": list(ORDERINGS),
        "conditions": per_condition,
        "summary": summary,
        "batch_size_sweep": {c: {o: {str(b): _mean_std(v) for b, v in d.items()} for o, d in s.items()}
                             for c, s in sweep.items()},
        "layer_sensitivity": layers if opts.layer_sensitivity else {},
        "entropy": entropy,
        "wall_seconds": time.perf_counter() - t_start,
    }
    json_path = os.path.join(opts.out, "audit.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    paths = [json_path, write_report(result, opts.out)]
    try:
        paths += write_plots(result, opts.out)
    except ImportError:  # matplotlib comes with the [bench] and [test] extras
        progress.note("plots skipped: matplotlib is not installed")
    result["paths"] = paths
    progress.note(f"done in {result['wall_seconds']:.1f}s: " + ", ".join(paths))
    return result


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def _pct(s: dict[str, float], spread: bool = True) -> str:
    if s["n"] > 1 and spread:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
    return f"{100 * s['mean']:.1f}"


def _pp(s: dict[str, float]) -> str:
    sign = "+" if s["mean"] >= 0 else "−"
    core = f"{sign}{abs(100 * s['mean']):.1f}"
    return core + (f" ± {100 * s['std']:.1f}" if s["n"] > 1 else "")


def _verdict(s: dict) -> str:
    if s["stochastic"]:
        if s.get("batch_dependent") is None:
            return "random (see floor)"
        return "**yes** (same draws)" if s["batch_dependent"] else "no (same draws)"
    return "**yes**" if s["batch_dependent"] else "no"


def _same_draws_note(sm: dict) -> str:
    """The report's sentence on the same-draw comparison of the random noises ('' when none was made)."""
    rows = [n for n in sm if sm[n]["stochastic"] and sm[n].get("paired_max_logit_diff") is not None]
    if not rows:
        return ""
    return ("With the same noise drawn for every image (the random streams restarted before each batch; each image "
            "keeps its slot in a class-sorted batch while its batch mates are exchanged), the largest logit change "
            "is " + "; ".join(f"`{n}` {sm[n]['paired_max_logit_diff']:.2e}" for n in rows)
            + ": that comparison, not the floor, says whether the noise reads the rest of the batch "
              "(*(same draws)* in the table).")


def _interpretation(result: dict) -> list[str]:
    sm = result["summary"]
    none, off = sm["none"], sm["official"]
    lines = []
    a = {o: off["accuracy"][o]["mean"] for o in ORDERINGS}
    base = none["accuracy"]["shuffled"]["mean"]
    lines.append(
        f"- **Official protocol.** With class-sorted test batches it scores {100 * a['sorted']:.1f}%, against "
        f"{100 * a['shuffled']:.1f}% with shuffled batches and {100 * a['single']:.1f}% at batch size 1; the same "
        f"weights without the noise score {100 * base:.1f}%. "
        + ("The gain exists only when a batch holds same-class images: it is read off the batch composition, "
           "not off the image. " if a["sorted"] > base + 0.005 and a["shuffled"] < a["sorted"] - 0.005 else
           "In this run the sorted-batch gain did not appear as expected (see the numbers above). ")
        + ("At batch size 1 the batch-axis mix is the identity (k = 1), so it equals the no-noise model. "
           if abs(a["single"] - base) < 0.005 else ""))
    local = [n for n in ("none", "optimal/tokens", "optimal/rows", "shift/tokens", "shift/rows")]
    dep_local = [n for n in local if sm[n]["batch_dependent"]]
    worst = max(sm[n]["max_logit_diff"] for n in local)
    tol = max(sm[n]["tolerance"] for n in local)
    lines.append(
        "- **Sample-local noise.** " + (
            f"For no noise and the tokens/rows linear noises, no sample's logits moved by more than {worst:.1e} "
            f"(tolerance {tol:.0e}) between sorted batches, shuffled batches and batch size 1, and no prediction "
            "changed: their accuracy does not depend on the ordering."
            if not dep_local else f"Unexpected: {dep_local} changed with the batch ordering (see table)."))
    deltas = {n: sm[n]["accuracy"]["shuffled"]["mean"] - base for n in local[1:]}
    spreads = [sm[n]["accuracy"]["shuffled"]["std"] for n in local]
    best = max(deltas, key=lambda n: abs(deltas[n]))
    n_seeds = len(result["options"]["seeds"])
    lines.append(
        "- **Does positive noise help here?** Relative to no noise (shuffled batches), the sample-local linear "
        "noises change accuracy by " + ", ".join(f"{n} {100 * d:+.1f}" for n, d in deltas.items())
        + f" points (seed spread up to {100 * max(spreads):.1f} points, {n_seeds} seed(s)). "
        + ("One seed gives no spread to judge a difference by. " if n_seeds < 2 else
           f"The largest difference ({best}) is within two seed spreads: no clear effect either way. "
           if abs(deltas[best]) <= 2 * max(spreads) else f"{best} differs by more than two seed spreads. "))
    for n in ("gaussian", "salt_and_pepper", "salt_and_pepper/batch"):
        if n not in sm:
            continue
        s = sm[n]
        same = s.get("paired_max_logit_diff")
        if same is None:
            verdict = "The same-draw comparison was not possible; the accuracies are what to compare."
        elif not s["batch_dependent"]:
            verdict = ("With the same draw for every image and other batch mates no logit moved by more than "
                       f"{same:.1e} (tolerance {s['tolerance']:.0e}): batch-independent"
                       + ("; salt-and-pepper takes each sample's own range by default." if n == "salt_and_pepper"
                          else "."))
        else:
            verdict = (f"With the same draw for every image and other batch mates logits moved by up to {same:.2g} "
                       f"(tolerance {s['tolerance']:.0e}): it reads the rest of the batch"
                       + (" (its high / low values are the batch's maximum and minimum)."
                          if n == "salt_and_pepper/batch" else "."))
        lines.append(
            f"- **{n}** (random, on at evaluation): accuracy sorted/shuffled/single "
            + "/".join(_pct(s["accuracy"][o], False) for o in ORDERINGS)
            + f"%. Two passes over identical batches already change up to {s['floor_max_logit_diff']:.2g} in a logit "
              f"(about {s['floor_n_argmax_changed']['mean']:.0f} prediction(s)), so per-sample differences between "
              "orderings cannot be blamed on the batch. " + verdict)
    sw = result["batch_size_sweep"]["official"]
    rng = {o: [100 * v["mean"] for v in sw[o].values()] for o in ("sorted", "shuffled")}
    lines.append(
        f"- **Batch size.** Over evaluation batch sizes {', '.join(sw['sorted'])}, the official protocol scores "
        f"{min(rng['sorted']):.1f}–{max(rng['sorted']):.1f}% with class-sorted batches and "
        f"{min(rng['shuffled']):.1f}–{max(rng['shuffled']):.1f}% with shuffled ones; the no-noise model is the same "
        "at every batch size. Larger sorted batches straddle more class boundaries (a class has about "
        f"{statistics.fmean(result['data']['test_per_class']):.0f} test images), so the pooled features are less pure.")
    ls = result.get("layer_sensitivity") or {}
    if ls:
        def per_block(key, o):
            return [statistics.fmean(r["accuracy"][o][i] for r in ls[key]) for i in range(len(ls[key][0]["layers"]))]

        tokens = per_block("optimal/tokens", "shuffled")
        gap = [a - b for a, b in zip(per_block("official", "sorted"), per_block("official", "shuffled"))]
        lines.append(
            "- **Layer sensitivity.** Trained with optimal/tokens at block 0, 1, ... the model reaches "
            + "/".join(f"{100 * v:.1f}" for v in tokens) + f"% (no noise {100 * base:.1f}%): "
            + ("averaging the tokens early costs accuracy, late it is nearly harmless. "
               if tokens[0] < tokens[-1] - 0.05 else "the block matters little here. ")
            + "The official protocol's sorted-minus-shuffled gap per block is "
            + "/".join(f"{100 * g:+.1f}" for g in gap) + " points: it depends on the batch at every block.")
    img = {r["name"]: r for r in result["entropy"]["images"]}
    lat = {r["name"]: r for r in result["entropy"]["last_block_input"]}
    tok = img["optimal/tokens"]
    local = max(abs(r[n]["H_Y_given_Z_change"]) for r in (img, lat)
                for n in ("optimal/tokens", "optimal/rows", "shift/tokens", "shift/rows"))

    def move(r):
        return f"{r['H_Y_given_Z_before']:.3f} → {r['H_Y_given_Z_after']:.3f}"

    def trend(r, name):
        change = r[name]["H_Y_given_Z_change"]
        return "lowers" if change < -0.005 else "raises" if change > 0.005 else "leaves"

    sorted_trend = {trend(r, "optimal/batch, sorted") for r in (img, lat)}
    shuffled_raises = {trend(r, "optimal/batch, shuffled") for r in (img, lat)} == {"raises"}
    if sorted_trend == {"lowers"} and shuffled_raises:
        pattern = ("Mixed with its classmates, an image carries their label information; mixed with random "
                   "images, it loses its own.")
    elif sorted_trend <= {"lowers", "leaves"} and shuffled_raises:
        pattern = ("Mixed with random images, a sample loses label information; mixed with its classmates it "
                   "loses none, and gains some where the estimate had room to fall (a near-zero estimate cannot "
                   "fall further).")
    else:
        pattern = "The expected pattern (sorted batches lower H(Y|Z), shuffled raise it) did not hold here."
    lines.append(
        f"- **Entropy.** On the images, optimal/tokens has the paper's dS = {tok['delta_S']:.1f} nats and moves the "
        f"Gaussian H(Z) by {tok['H_Z_after'] - tok['H_Z_before']:+.1f} nats, while no sample-local linear noise "
        f"moves the H(Y|Z) estimate by more than {local:.3f} nats on the images or the last block's input (0 in "
        "exact arithmetic: an invertible per-sample map neither adds nor removes label information). dS measures "
        "volume change, not task simplification. Mixing across the batch does change H(Y|Z): class-sorted batches "
        f"{move(img['optimal/batch, sorted'])} nats (images) and {move(lat['optimal/batch, sorted'])} (last block "
        f"input); shuffled batches {move(img['optimal/batch, shuffled'])} and "
        f"{move(lat['optimal/batch, shuffled'])}. "
        + pattern + " The last block's features are of images the model was partly trained on (all "
        f"{result['entropy']['shapes']['last_block_input'][0]} images are used), so their low H(Y|Z) is "
        "optimistic for unseen images.")
    return lines


def write_report(result: dict, out_dir: str) -> str:
    """Write ``report.md`` for an audit result; returns its path."""
    env, opts, sm = result["environment"], result["options"], result["summary"]
    L: list[str] = []
    L.append("# NoisyNN batch-dependence audit\n")
    if opts["fast"]:
        L.append("> **`--fast` smoke run**: 1 seed, very few epochs, a subset of the images. The numbers check the "
                 "pipeline, they are "
                 "not results.\n")
    L.append("Does NoisyNN's accuracy gain survive when a prediction may not look at the other images in its "
             "batch? The paper's headline (95% ImageNet top-1 for NoisyViT-B) was measured with features mixed "
             "across class-sorted test batches. This audit trains a small NoisyViT from scratch on real data "
             "under each noise condition and evaluates every model three ways: class-sorted batches of "
             f"{opts['eval_batch_size']} (as the official test loader), shuffled batches of "
             f"{opts['eval_batch_size']}, and batch size 1. It was produced by `noisynn audit` "
             "(`noisynn_kernels/audit.py`); every number below is measured in this run.\n")
    L.append("## Environment\n")
    L.append("| | |\n|---|---|")
    for k in ("device", "threads", "torch", "timm", "scikit-learn", "noisynn_kernels", "python", "commit", "date"):
        L.append(f"| {k} | {env.get(k)} |")
    L.append(f"| seeds | {', '.join(map(str, opts['seeds']))} (model init and training batch order; fixed data "
             "split) |")
    t = opts["train"]
    L.append(f"| training | {t['epochs']} epochs, AdamW lr {t['lr']} (one-cycle, warm-up {t['warmup']}), weight "
             f"decay {t['weight_decay']}, batch {t['batch_size']}, cross-entropy, no augmentation |")
    L.append(f"| wall time | {result['wall_seconds']:.0f} s |\n")
    d, m = result["data"], result["model"]
    L.append("## Set-up\n")
    L.append(f"- **Data**: `{d['name']}` (1,797 8 x 8 grey images, 10 classes, no download), stratified split "
             f"{d['train']} train / {d['test']} test (test images per class: {d['test_per_class']}), pixels "
             "standardised with the training mean and std. Class sizes are not multiples of the batch size, so a "
             "few sorted batches straddle two classes (`purity` in `audit.json`).")
    L.append(f"- **Model**: `timm.create_model('{m['model_name']}', img_size={m['img_size']}, "
             f"patch_size={m['patch_size']}, in_chans={m['in_chans']}, embed_dim={m['embed_dim']}, "
             f"depth={m['depth']}, num_heads={m['num_heads']}, num_classes={m['num_classes']}, noise=...)`: a timm "
             f"VisionTransformer with a 4 x 4 patch grid plus a class token, {m['parameters']:,} parameters.")
    L.append("- **Conditions** (noise at the last of the 4 blocks):\n")
    L.append("| condition | noise |\n|---|---|")
    for name, entry in result["conditions"].items():
        L.append(f"| `{name}` | {entry['description']} |")
    L.append("")
    L.append("## Accuracy under three batch orderings\n")
    L.append("Top-1 test accuracy in %, mean ± std over seeds. *Batch-dependent* compares every test image's "
             "logits across the three orderings: only the rest of its batch changed, so a change beyond float "
             "noise (tolerance in the last column, relative to the largest logit) is batch dependence.\n")
    L.append("| condition | sorted | shuffled | batch size 1 | sorted − shuffled (pts) | max \\|Δ logit\\| across "
             "orderings | predictions changed (of test) | batch-dependent | tolerance |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    n_test = d["test"]
    for name, s in sm.items():
        L.append(f"| `{name}` | {_pct(s['accuracy']['sorted'])} | {_pct(s['accuracy']['shuffled'])} | "
                 f"{_pct(s['accuracy']['single'])} | {_pp(s['sorted_minus_shuffled'])} | {s['max_logit_diff']:.2e} | "
                 f"{s['n_argmax_changed']['mean']:.1f} of {n_test} | {_verdict(s)} | {s['tolerance']:.0e} |")
    L.append("")
    L.append("Random noises draw new values on every pass: two passes over *identical* batches already differ "
             "(floor): " + "; ".join(f"`{n}` max |Δ logit| {sm[n]['floor_max_logit_diff']:.2e}, "
                                    f"{sm[n]['floor_n_argmax_changed']['mean']:.1f} predictions changed"
                                    for n in sm if sm[n]["stochastic"]) + ". " + _same_draws_note(sm) + "\n")
    L.append("![accuracy by ordering](accuracy_by_ordering.png)\n")
    L.append("## Interpretation\n")
    L.extend(_interpretation(result))
    L.append("")
    L.append("## The official protocol and the evaluation batch size\n")
    sw = result["batch_size_sweep"]
    sizes = list(sw["official"]["sorted"])
    L.append("Accuracy in % of the no-noise weights with the official batch-axis noise switched on at evaluation "
             "(`official`) and without it (`none`), by evaluation batch size. Batch size 1 is the `single` "
             "column above.\n")
    L.append("| | " + " | ".join(f"bs {b}" for b in sizes) + " |")
    L.append("|---|" + "---|" * len(sizes))
    for c in ("official", "none"):
        for o in ("sorted", "shuffled"):
            L.append(f"| `{c}`, {o} | " + " | ".join(_pct(sw[c][o][b]) for b in sizes) + " |")
    L.append("\n![official protocol vs batch size](official_batch_size.png)\n")
    if result["layer_sensitivity"]:
        ls = result["layer_sensitivity"]
        L.append("## Layer sensitivity\n")
        L.append("The same training run with the noise at each block in turn (block input for `optimal/tokens`, "
                 "trained and evaluated with it; LayerNorm-1 output for the official protocol, on the no-noise "
                 "weights; at batch size 1 it is the identity). Accuracy in %, mean ± std over seeds. The last "
                 "block's `optimal/tokens` entry is the `optimal/tokens` condition's run (same configuration and "
                 "seed).\n")
        nb = len(ls["optimal/tokens"][0]["layers"])
        L.append("| | " + " | ".join(f"block {i}" for i in range(nb)) + " |")
        L.append("|---|" + "---|" * nb)
        rows = [("`optimal/tokens`, shuffled", "optimal/tokens", "shuffled")] + [
            (f"`official`, {o}", "official", o) for o in ("sorted", "shuffled")]
        for label, key, o in rows:
            cells = [_pct(_mean_std([r["accuracy"][o][i] for r in ls[key]])) for i in range(nb)]
            L.append(f"| {label} | " + " | ".join(cells) + " |")
        L.append(f"\nNo-noise reference (shuffled): {_pct(sm['none']['accuracy']['shuffled'])}.\n")
        L.append("![layer sensitivity](layer_sensitivity.png)\n")
    L.append("## Entropy diagnostics\n")
    L.append("Gaussian estimates, in nats (`noisynn_kernels.analysis.entropy_diagnostics`): `dS = -ln|det(I+Q)|` "
             "is the paper's entropy change for the k mixed rows; `ΔH(Z)` the change of the Gaussian feature "
             "entropy (predicted: `-(d/k) dS` for a sample-local invertible mix); `H(Y|Z)` the held-out "
             f"({opts['entropy_folds']}-fold) cross-entropy of a temperature-calibrated linear-discriminant "
             "posterior with Ledoit-Wolf "
             "shrinkage, an estimate (upper bound) of the task complexity. Batch-axis rows mix batches of "
             f"{opts['eval_batch_size']}, class-sorted or shuffled.\n")
    shapes = result["entropy"]["shapes"]
    for key, title in (("images", f"Training and test images `{tuple(shapes['images'])}`: pixels; tokens axis = "
                                  "the 64 positions, rows axis = the 8 rows"),
                       ("last_block_input", "Residual stream entering the last block of the seed-0 no-noise model "
                                            f"`{tuple(shapes['last_block_input'])}` (class token never mixed; the "
                                            "model was trained on the training images among them)")):
        rows = result["entropy"][key]
        L.append(f"**{title}.** H(Y) = {rows[0]['H_Y']:.3f}.\n")
        L.append("| noise | k | dS | ΔH(Z) measured | ΔH(Z) predicted | H(Y\\|Z) before | H(Y\\|Z) after | change |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in rows:
            pred = "" if r["expected_H_Z_change"] is None else f"{r['expected_H_Z_change']:+.1f}"
            ds = "" if r["delta_S"] is None else f"{r['delta_S']:.2f}"
            L.append(f"| {r['name']} | {'' if r['k'] is None else r['k']} | {ds} | "
                     f"{r['H_Z_after'] - r['H_Z_before']:+.1f} | {pred} | {r['H_Y_given_Z_before']:.3f} | "
                     f"{r['H_Y_given_Z_after']:.3f} | {r['H_Y_given_Z_change']:+.3f} |")
        L.append("")
    L.append("Measured and predicted ΔH(Z) differ because the covariances are shrunk: the pixel covariance is "
             "singular (some border pixels are always 0) and the latent one is poorly conditioned, so the estimate "
             "needs shrinkage, which is not invariant under the mix; without shrinkage the two agree to rounding "
             "(`tests/test_analysis.py`). An invertible sample-local mix cannot change H(Y|Z) in exact "
             "arithmetic; what the estimator shows for it is shrinkage and finite-sample error.\n")
    L.append("![entropy](entropy.png)\n")
    L.append("## Files\n")
    L.append("`audit.json` holds every per-seed number (per-ordering accuracy and batch purity, per-pair logit "
             "and probability differences, training losses, layer and batch-size sweeps, entropy rows) and the "
             "options; the PNGs are drawn from it.")
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------
_ORDER_COLORS = {"sorted": "#d62728", "shuffled": "#1f77b4", "single": "#2ca02c"}


def write_plots(result: dict, out_dir: str) -> list[str]:
    """Write ``accuracy_by_ordering.png``, ``official_batch_size.png``, ``layer_sensitivity.png`` (when
    run) and ``entropy.png``; returns their paths.  Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = result["environment"]
    sub = (f"digits, {len(result['options']['seeds'])} seed(s) x {result['options']['train']['epochs']} epochs | "
           f"torch {env['torch']} | {env['device']}")
    sm = result["summary"]
    paths = []

    paths.append(_plot_accuracy(plt, sm, result["options"]["eval_batch_size"], "NoisyViT test accuracy by batch "
                                "ordering (mean ± std over seeds)", sub, out_dir))

    sw = result["batch_size_sweep"]
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    for c, style in (("official", "-"), ("none", ":")):
        for o in ("sorted", "shuffled"):
            single = sm[c]["accuracy"]["single"]
            bs = [1] + [int(b) for b in sw[c][o]]
            mean = [single["mean"]] + [sw[c][o][b]["mean"] for b in sw[c][o]]
            std = [single["std"]] + [sw[c][o][b]["std"] for b in sw[c][o]]
            ax.errorbar(bs, [100 * v for v in mean], yerr=[100 * v for v in std], fmt="o" + style, capsize=2,
                        color=_ORDER_COLORS[o], label=f"{c}, {o}", alpha=1.0 if c == "official" else 0.6)
    ax.set_xscale("log")
    ax.set_xlabel("evaluation batch size")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Official protocol (batch-axis optimal Q at eval) vs batch size\n{sub}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, plt, out_dir, "official_batch_size.png"))

    ls = result["layer_sensitivity"]
    if ls:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
        nb = len(ls["optimal/tokens"][0]["layers"])
        blocks = list(range(nb))
        for ax, key, orders in ((axes[0], "optimal/tokens", ("shuffled",)),
                                (axes[1], "official", ("sorted", "shuffled"))):
            for o in orders:
                st = [_mean_std([r["accuracy"][o][i] for r in ls[key]]) for i in blocks]
                ax.errorbar(blocks, [100 * s["mean"] for s in st], yerr=[100 * s["std"] for s in st], fmt="o-",
                            capsize=2, color=_ORDER_COLORS[o], label=o if o != "single" else "batch size 1")
            ax.axhline(100 * sm["none"]["accuracy"]["shuffled"]["mean"], color="grey", ls=":", label="no noise")
            ax.set_xticks(blocks)
            ax.set_xlabel("block with the noise")
            ax.set_title({"optimal/tokens": "optimal/tokens at block input (trained with it)",
                          "official": "official protocol at block's LN-1 (no-noise weights)"}[key], fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("test accuracy (%)")
        fig.suptitle(f"Layer sensitivity | {sub}", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, plt, out_dir, "layer_sensitivity.png"))

    ent = result["entropy"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, title in ((axes[0], "images", "images"), (axes[1], "last_block_input", "last block input")):
        rows = ent[key]
        xs = range(len(rows))
        ax.bar([i - 0.2 for i in xs], [r["H_Y_given_Z_before"] for r in rows], 0.4, label="before", color="#7f7f7f")
        ax.bar([i + 0.2 for i in xs], [r["H_Y_given_Z_after"] for r in rows], 0.4, label="after", color="#1f77b4")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["name"] for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("H(Y|Z) estimate (nats, lower = labels easier)")
        ax.set_title(f"{title}: H(Y|Z) before / after the noise", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Gaussian entropy diagnostics | {sub}", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, plt, out_dir, "entropy.png"))
    return paths


def _plot_accuracy(plt, sm: dict, eval_batch_size: int, title: str, sub: str, out_dir: str) -> str:
    """``accuracy_by_ordering.png``: one group of bars per condition, one bar per ordering."""
    names = list(sm)
    fig, ax = plt.subplots(figsize=(max(6.0, min(10.0, 2 + 1.1 * len(names))), 4.6))
    width = 0.8 / len(ORDERINGS)
    for j, o in enumerate(ORDERINGS):
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(xs, [100 * sm[n]["accuracy"][o]["mean"] for n in names], width,
               yerr=[100 * sm[n]["accuracy"][o]["std"] for n in names], capsize=2,
               label={"single": "batch size 1"}.get(o, f"{o} batches of {eval_batch_size}"),
               color=_ORDER_COLORS[o])
    lo = min(100 * sm[n]["accuracy"][o]["mean"] for n in names for o in ORDERINGS)
    ax.set_ylim(max(0.0, lo - 10), 100)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}\n{sub}", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, out_dir, "accuracy_by_ordering.png")


def _save(fig, plt, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# the audit of a user's model on a user's image folder
# --------------------------------------------------------------------------------------------------
@dataclass
class FolderAuditOptions:
    """What ``noisynn audit --data DIR`` runs (the CLI flags map one to one).

    Attributes:
        data: the image folder (one sub-folder per class), streamed through timm's evaluation transform.
        model: timm model name (a registered ``noisy_*`` name or any timm model); ``None``: the checkpoint's.
        checkpoint: a ``noisynn train`` checkpoint, or a plain ``state_dict`` (also under a ``model`` or
            ``state_dict`` key) of ``model``; loaded with ``strict=True``.  ``None``: ``pretrained`` weights,
            or (a smoke test only) the random initial weights.
        pretrained: start from timm's pretrained weights (when no checkpoint is given).
        out: output directory.
        img_size: input size (default: the checkpoint's, else the model's own).
        model_kwargs: extra ``timm.create_model`` arguments (a checkpoint's own are used when it has them).
        noises: extra conditions: NoiseConfig / dict / ``--noise`` text, each evaluated on the same weights
            (a batch-dependent one needs its explicit ``allow_batch_dependence=true``).
        official: also evaluate the official batch-axis protocol (eval-only, explicit opt-in).
        batch_size: batch size of the sorted and shuffled orderings (the official loader uses 10).
        batch_sizes: evaluation batch sizes of the official-protocol sweep (empty: no sweep).
        max_images: a stratified subset of at most this many images (``None``: all).
        seed: seed of the shuffled ordering and the subset.
        workers: DataLoader worker processes reading the images.
        bad_images: ``stop`` or ``skip`` (see :func:`~noisynn_kernels.analysis.scan_image_folder`).
        device: ``auto``, ``cpu``, ``cuda``...
        threads: ``torch.set_num_threads`` for the run (``None``: torch's setting).
        quiet: no progress display.
    """

    data: str
    model: str | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    out: str = "audit-results"
    img_size: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    noises: tuple = ()
    official: bool = True
    batch_size: int = 10
    batch_sizes: tuple[int, ...] = (2, 10, 50)
    max_images: int | None = None
    seed: int = 0
    workers: int = 0
    bad_images: str = "stop"
    device: str = "auto"
    threads: int | None = None
    quiet: bool = False


def _load_checkpoint(path: str) -> dict:
    """A checkpoint as ``{"model": state_dict, ...}``: a ``noisynn train`` checkpoint, or a plain state dict
    (possibly under ``state_dict`` / ``model``)."""
    from .train import CHECKPOINT_FORMAT

    if not os.path.isfile(path):
        raise ConfigError(f"--checkpoint {path!r} is not a file; expected a noisynn train checkpoint.pt or a "
                          "state_dict saved with torch.save")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure)
        raise ConfigError(f"--checkpoint {path!r} could not be read: {e}") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        return ckpt
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(ckpt.get(key), dict):
                return {"model": ckpt[key]}
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return {"model": ckpt}
    raise ConfigError(f"--checkpoint {path!r} holds no state_dict; expected a noisynn train checkpoint or a "
                      "state_dict (a dict of tensors, possibly under 'state_dict' or 'model')")


def _subset_index(index, n: int | None, seed: int):
    """At most ``n`` images of a FolderIndex, every class in proportion (at least one each), seeded."""
    from .analysis import FolderIndex

    if n is None or n >= len(index.samples):
        return index
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, t) in enumerate(index.samples):
        by_class.setdefault(t, []).append(i)
    keep = []
    for idx in by_class.values():
        k = max(1, round(n * len(idx) / len(index.samples)))
        perm = torch.randperm(len(idx), generator=g)[:k]
        keep.extend(idx[int(j)] for j in perm)
    keep.sort()
    return FolderIndex(root=index.root, classes=index.classes, samples=[index.samples[i] for i in keep],
                       skipped=index.skipped, ignored=index.ignored)


def _official_for(model) -> NoiseConfig:
    from .models import model_family

    if model_family(model) == "vit":
        return NoiseConfig.official_vit(allow_batch_dependence=True)
    return NoiseConfig.official_cnn(allow_batch_dependence=True)


def run_folder(opts: FolderAuditOptions) -> dict:
    """Audit a model on an image folder: every condition (no noise, each of ``opts.noises``, the official
    protocol, and the checkpoint's own training noise) evaluated on the same weights under class-sorted
    batches, shuffled batches and batch size 1
    (:func:`~noisynn_kernels.analysis.batch_dependence`, streaming the folder), plus the official
    protocol's accuracy by evaluation batch size.  Writes ``report.md``, ``audit.json`` and PNG plots into
    ``opts.out``; returns the result dict (with ``paths``)."""
    threads_before = torch.get_num_threads()
    if opts.threads is not None:
        if isinstance(opts.threads, bool) or not isinstance(opts.threads, int) or opts.threads < 1:
            raise ConfigError(f"threads must be an int >= 1 or None, got {opts.threads!r}")
        torch.set_num_threads(opts.threads)
    try:
        return _run_folder(opts)
    finally:
        torch.set_num_threads(threads_before)


def _run_folder(opts: FolderAuditOptions) -> dict:
    from torch.utils.data import DataLoader

    from .models import apply_noisynn, noise_config, remove_noisynn
    from .train import CHECKPOINT_FORMAT, create_model, parse_noise

    t_start = time.perf_counter()
    for name, value, lo in (("batch_size", opts.batch_size, 1), ("seed", opts.seed, 0), ("workers", opts.workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConfigError(f"{name} must be an int >= {lo}, got {value!r}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in opts.batch_sizes):
        raise ConfigError(f"batch_sizes must be ints >= 1, got {opts.batch_sizes!r}")
    if opts.max_images is not None and (isinstance(opts.max_images, bool) or not isinstance(opts.max_images, int)
                                        or opts.max_images < 2):
        raise ConfigError(f"max_images must be an int >= 2 or None, got {opts.max_images!r}")
    if opts.model is None and opts.checkpoint is None:
        raise ConfigError("give the model (--model NAME) or a noisynn train checkpoint (--checkpoint FILE)")
    progress = Progress(0, opts.quiet, width=2)
    index = analysis.scan_image_folder(opts.data, on_bad_image=opts.bad_images, workers=opts.workers,
                                       progress=progress.note)
    index = _subset_index(index, opts.max_images, opts.seed)

    ckpt = _load_checkpoint(opts.checkpoint) if opts.checkpoint else None
    trained = ckpt is not None and ckpt.get("format") == CHECKPOINT_FORMAT
    kwargs = dict(ckpt["create_kwargs"]) if trained else dict(opts.model_kwargs)
    if trained and opts.model_kwargs:
        kwargs.update(opts.model_kwargs)
    name = opts.model or ckpt["arch"]
    if trained:
        if ckpt["classes"] != index.classes:
            raise ConfigError(f"the checkpoint {opts.checkpoint!r} was trained on classes {ckpt['classes']}; the "
                              f"folder {opts.data!r} has {index.classes}")
        kwargs.pop("num_classes", None)
    img_size = opts.img_size if opts.img_size is not None else kwargs.pop("img_size", None)
    kwargs.pop("img_size", None)
    # the training resolution of a model that does not take img_size (e.g. a ResNet trained at 32 px)
    data_size = img_size if img_size is not None else (ckpt.get("img_size") if trained else None)
    model, arch, create_kwargs = create_model(name, num_classes=len(index.classes), img_size=img_size,
                                              model_kwargs=kwargs, noise=False,
                                              pretrained=opts.pretrained and ckpt is None)
    if trained and arch != ckpt["arch"]:
        raise ConfigError(f"--model {name!r} is the architecture {arch}; the checkpoint is for {ckpt['arch']}")
    remove_noisynn(model)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise ConfigError(f"the checkpoint {opts.checkpoint!r} does not fit {arch} with {create_kwargs}: "
                              f"{str(e).splitlines()[0]} ...") from None
    weights = ("checkpoint " + opts.checkpoint if ckpt is not None else
               "timm pretrained" if opts.pretrained else "random initialisation (no checkpoint: a smoke test only)")
    from .analysis.profile import input_size_of

    size = input_size_of(model)
    img_size = data_size if data_size is not None else (size[1] if size else 224)
    in_chans = int(create_kwargs.get("in_chans", 3))
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if opts.device == "auto" else opts.device))
    model.to(device).eval()
    transform = analysis.model_transform(model, img_size, training=False, in_chans=in_chans)
    dataset = analysis.ImageFolderDataset(index, transform, mode="L" if in_chans == 1 else "RGB")
    loader = DataLoader(dataset, num_workers=opts.workers)  # the audit takes its workers, not its batching

    conds: dict[str, NoiseConfig | None] = {"none": None}
    descriptions = {"none": f"no noise ({weights})"}
    if trained and ckpt.get("noise") and NoiseConfig.coerce(ckpt["noise"]).eval:
        cfg = NoiseConfig.coerce(ckpt["noise"])
        conds["trained noise"] = cfg
        descriptions["trained noise"] = f"the checkpoint's training noise ({cfg.kind}/{cfg.axis}, {cfg.position})"
    for spec in opts.noises:
        cfg = parse_noise(spec) if isinstance(spec, str) else NoiseConfig.coerce(spec)
        if not isinstance(cfg, NoiseConfig):
            raise ConfigError(f"a requested noise must name a noise, got {spec!r}")
        if not cfg.eval:
            raise ConfigError(f"the requested noise {spec!r} is off at evaluation (eval=False), so it would be the "
                              "no-noise condition; the audit evaluates: leave eval at its default (true)")
        label = spec if isinstance(spec, str) else f"{cfg.kind}/{cfg.axis}"
        conds[label] = cfg
        descriptions[label] = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()
                                        if v != NoiseConfig().to_dict()[k] or k == "kind")
    if opts.official:
        conds["official"] = _official_for(model)
        descriptions["official"] = ("official protocol: " + ("optimal Q across the batch on LN-1 output of the last "
                                    "block" if conds["official"].position == "attn_input" else
                                    "shift Q (a = 0.4) across the batch at the last block input")
                                    + ", eval only; batch-dependent, explicit opt-in")
    progress.total = len(conds) + (1 if opts.official and opts.batch_sizes else 0)
    progress.note(f"{len(dataset)} images in {len(index.classes)} classes; {arch} ({weights}); "
                  f"{len(conds)} condition(s); output {opts.out}")
    os.makedirs(opts.out, exist_ok=True)

    per_condition: dict[str, dict[str, Any]] = {}
    official_model = None
    for label, cfg in conds.items():
        m = model if cfg is None else apply_noisynn(copy.deepcopy(model), cfg)
        if cfg is not None and noise_config(m) is None:
            raise ConfigError(f"the noise {label!r} was not attached")
        t0 = time.perf_counter()
        dep = analysis.batch_dependence(m, loader, batch_size=opts.batch_size, orderings=ORDERINGS, seed=opts.seed,
                                        device=device)
        seconds = time.perf_counter() - t0
        per_condition[label] = {"config": None if cfg is None else cfg.to_dict(), "description": descriptions[label],
                                "seeds": [{"seed": opts.seed, "eval_seconds": seconds, **dep.to_dict()}]}
        progress(f"{label:<16} acc sorted/shuffled/single "
                 + "/".join(f"{100 * dep.accuracy[o]:.1f}" for o in ORDERINGS) + f"  ({seconds:.1f}s)")
        if label == "official":
            official_model = m
    sweep: dict[str, dict[str, Any]] = {}
    if official_model is not None and opts.batch_sizes:
        for o in ("sorted", "shuffled"):
            sweep[o] = {str(b): analysis.evaluate_accuracy(official_model, loader, batch_size=b, ordering=o,
                                                           seed=opts.seed, device=device)
                        for b in opts.batch_sizes}
        progress(f"official protocol vs eval batch size {list(opts.batch_sizes)}")

    summary = {}
    for label, entry in per_condition.items():
        r = entry["seeds"][0]
        summary[label] = {
            "accuracy": {o: _mean_std([r["accuracy"][o]]) for o in ORDERINGS},
            "sorted_minus_shuffled": _mean_std([r["accuracy"]["sorted"] - r["accuracy"]["shuffled"]]),
            "sorted_minus_single": _mean_std([r["accuracy"]["sorted"] - r["accuracy"]["single"]]),
            "max_logit_diff": r["max_logit_diff"], "max_prob_diff": r["max_prob_diff"],
            "n_argmax_changed": _mean_std([r["n_argmax_changed"]]),
            "floor_max_logit_diff": r["floor"]["max_logit_diff"],
            "floor_n_argmax_changed": _mean_std([r["floor"]["n_argmax_changed"]]),
            "tolerance": r["tolerance"], "stochastic": r["stochastic"], "batch_dependent": r["batch_dependent"],
            "paired_max_logit_diff": None if r.get("paired") is None else r["paired"]["max_logit_diff"],
            "purity": r["purity"],
        }
    env = dict(environment(device))
    env["threads"] = torch.get_num_threads()
    result = {
        "kind": "folder",
        "environment": env,
        "options": {**asdict(opts), "noises": [str(n) for n in opts.noises], "eval_batch_size": opts.batch_size},
        "model": {"name": name, "arch": arch, "create_kwargs": create_kwargs, "img_size": img_size,
                  "weights": weights, "parameters": sum(p.numel() for p in model.parameters()),
                  "checkpoint_noise": ckpt.get("noise") if trained else None},
        "data": {**index.summary(), "transform": str(transform)},
        "orderings": list(ORDERINGS),
        "conditions": per_condition,
        "summary": summary,
        "batch_size_sweep": sweep,
        "wall_seconds": time.perf_counter() - t_start,
    }
    json_path = os.path.join(opts.out, "audit.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    paths = [json_path, write_folder_report(result, opts.out)]
    try:
        paths += write_folder_plots(result, opts.out)
    except ImportError:
        progress.note("plots skipped: matplotlib is not installed")
    result["paths"] = paths
    progress.note(f"done in {result['wall_seconds']:.1f}s: " + ", ".join(paths))
    return result


def write_folder_report(result: dict, out_dir: str) -> str:
    """Write ``report.md`` for a folder audit result (:func:`run_folder`); returns its path."""
    env, opts, sm, d, m = result["environment"], result["options"], result["summary"], result["data"], result["model"]
    bs = opts["batch_size"]
    L: list[str] = ["# NoisyNN batch-dependence audit of an image folder\n"]
    L.append("Does the model's accuracy, with each noise, depend on which other images share its batch? Every "
             f"condition is evaluated on the same weights three ways: class-sorted batches of {bs} (as the official "
             f"NoisyViT test loader), shuffled batches of {bs}, and batch size 1. Produced by `noisynn audit --data` "
             "(`noisynn_kernels/audit.py`); every number below is measured in this run.\n")
    L.append("## Environment\n")
    L.append("| | |\n|---|---|")
    for k in ("device", "threads", "torch", "timm", "noisynn_kernels", "python", "commit", "date"):
        L.append(f"| {k} | {env.get(k)} |")
    L.append(f"| wall time | {result['wall_seconds']:.0f} s |\n")
    L.append("## Set-up\n")
    per = d["per_class"]
    shown = ", ".join(f"{c}: {n}" for c, n in list(per.items())[:20]) + (" ..." if len(per) > 20 else "")
    L.append(f"- **Data**: `{d['root']}`, {d['images']} images in {len(d['classes'])} classes ({shown})"
             + (f"; {d['skipped']} unreadable image(s) skipped (listed in `audit.json`)" if d["skipped"] else "")
             + (f"; a stratified subset of at most {opts['max_images']} images" if opts.get("max_images") else "")
             + ". Read from the folder batch by batch through timm's evaluation transform.")
    L.append(f"- **Model**: `{m['name']}` (timm `{m['arch']}`, {m['parameters']:,} parameters, input "
             f"{m['img_size']} px), weights: {m['weights']}.")
    L.append("- **Conditions**:\n")
    L.append("| condition | noise |\n|---|---|")
    for name, entry in result["conditions"].items():
        L.append(f"| `{name}` | {entry['description']} |")
    L.append("")
    L.append("## Accuracy under three batch orderings\n")
    L.append("Top-1 accuracy in %. *Batch-dependent* compares every image's logits across the three orderings: "
             "only the rest of its batch changed, so a change beyond float noise (tolerance, relative to the "
             "largest logit) is batch dependence. *Purity*: the share of images whose sorted batch holds one class.\n")
    L.append("| condition | sorted | shuffled | batch size 1 | sorted − shuffled (pts) | max \\|Δ logit\\| across "
             "orderings | predictions changed | batch-dependent | tolerance |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for name, s in sm.items():
        L.append(f"| `{name}` | {_pct(s['accuracy']['sorted'])} | {_pct(s['accuracy']['shuffled'])} | "
                 f"{_pct(s['accuracy']['single'])} | {_pp(s['sorted_minus_shuffled'])} | {s['max_logit_diff']:.2e} | "
                 f"{s['n_argmax_changed']['mean']:.0f} of {d['images']} | {_verdict(s)} | {s['tolerance']:.0e} |")
    L.append("")
    first = next(iter(sm.values()))
    L.append(f"Sorted-batch purity: {100 * first['purity'].get('sorted', 0.0):.0f}%.")
    random_ = [n for n in sm if sm[n]["stochastic"]]
    if random_:
        L.append("Random noises draw new values on every pass: two passes over *identical* batches already differ "
                 "(floor): " + "; ".join(f"`{n}` max |Δ logit| {sm[n]['floor_max_logit_diff']:.2e}" for n in random_)
                 + ". " + (_same_draws_note(sm) or "For them compare the accuracies, not the per-image differences."))
    L.append("\n![accuracy by ordering](accuracy_by_ordering.png)\n")
    L.append("## Interpretation\n")
    none = sm["none"]["accuracy"]
    for name, s in sm.items():
        a = {o: 100 * s["accuracy"][o]["mean"] for o in ORDERINGS}
        if s["stochastic"]:
            what = "random: its outputs change between identical passes, so only the accuracies can be compared"
        elif s["batch_dependent"]:
            what = (f"**batch-dependent**: {s['n_argmax_changed']['mean']:.0f} prediction(s) change with the batch "
                    "ordering; its accuracy is a property of how the test batches were formed, not of single images")
        else:
            what = "sample-local: no image's prediction depends on its batch mates"
        L.append(f"- `{name}`: sorted {a['sorted']:.1f}%, shuffled {a['shuffled']:.1f}%, batch size 1 "
                 f"{a['single']:.1f}% (no noise: {100 * none['shuffled']['mean']:.1f}%); {what}.")
    L.append("")
    sw = result["batch_size_sweep"]
    if sw:
        sizes = list(sw["sorted"])
        L.append("## The official protocol and the evaluation batch size\n")
        L.append("Accuracy in % with the official batch-axis noise at evaluation, by evaluation batch size (batch "
                 "size 1 is the `single` column above).\n")
        L.append("| | " + " | ".join(f"bs {b}" for b in sizes) + " |")
        L.append("|---|" + "---|" * len(sizes))
        for o in ("sorted", "shuffled"):
            L.append(f"| `official`, {o} | " + " | ".join(f"{100 * sw[o][b]:.1f}" for b in sizes) + " |")
        L.append("\n![official protocol vs batch size](official_batch_size.png)\n")
    L.append("## Files\n")
    L.append("`audit.json` holds every number (per-ordering accuracy and batch purity, per-pair logit and "
             "probability differences, the folder summary, the options); the PNGs are drawn from it.")
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path


def write_folder_plots(result: dict, out_dir: str) -> list[str]:
    """Write ``accuracy_by_ordering.png`` and (with a sweep) ``official_batch_size.png`` for a folder audit;
    returns their paths.  Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env, m = result["environment"], result["model"]
    sub = (f"{os.path.basename(result['data']['root'].rstrip(os.sep))}: {result['data']['images']} images, "
           f"{m['arch']} | torch {env['torch']} | {env['device']}")
    paths = [_plot_accuracy(plt, result["summary"], result["options"]["batch_size"],
                            "Accuracy by batch ordering", sub, out_dir)]
    sw = result["batch_size_sweep"]
    if sw:
        fig, ax = plt.subplots(figsize=(6.5, 4.3))
        single = result["summary"]["official"]["accuracy"]["single"]["mean"]
        for o in ("sorted", "shuffled"):
            bs = [1] + [int(b) for b in sw[o]]
            ax.plot(bs, [100 * single] + [100 * v for v in sw[o].values()], "o-", color=_ORDER_COLORS[o],
                    label=f"official, {o}")
        ax.axhline(100 * result["summary"]["none"]["accuracy"]["shuffled"]["mean"], color="grey", ls=":",
                   label="no noise")
        ax.set_xscale("log")
        ax.set_xlabel("evaluation batch size")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Official protocol vs batch size\n{sub}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, plt, out_dir, "official_batch_size.png"))
    return paths
