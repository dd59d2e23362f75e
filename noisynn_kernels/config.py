"""NoiseConfig: what noise, where in the model, and when it is on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from . import quality
from ._checks import AXES, VALUE_RANGES, number, shift_direction
from .errors import BatchDependenceError, ConfigError

__all__ = ["NoiseConfig", "KINDS", "RANDOM_KINDS", "POSITIONS"]

#: Every noise kind: the linear transform kinds, then the random (harmful) ones.
RANDOM_KINDS = ("gaussian", "salt_and_pepper")
KINDS = quality.LINEAR_KINDS + RANDOM_KINDS

#: Where in a model the noise is injected.
POSITIONS = ("block_input", "attn_input", "attn_output", "image")

BATCH_DEPENDENCE_MESSAGE = (
    "mixing along axis='batch' at inference makes every prediction depend on the other samples in its batch "
    "(the NoisyNN paper's headline accuracy was measured this way, on class-sorted test batches). "
    "Pass allow_batch_dependence=True to ask for it explicitly, or set eval=False to mix only in training, "
    "or use a sample-local axis ('tokens' or 'rows')."
)


@dataclass(frozen=True, eq=False)
class NoiseConfig:
    """One NoisyNN noise: its kind and parameters, where it is injected and in which modes.

    Attributes:
        kind: ``identity``, ``shift``, ``optimal``, ``dense`` (linear transform noise ``(I+Q)X``) or
            ``gaussian``, ``salt_and_pepper`` (random harmful noise).
        axis: mixed axis of linear noise: ``tokens`` (patch tokens of one sample / H*W positions),
            ``rows`` (rows of the patch grid / H) or ``batch`` (the samples of the mini-batch).
        alpha: shift strength ``a`` in ``[0, 1]`` (``shift`` only).
        shift: direction of the ``shift`` kind, as ``torch.roll``'s ``shifts``: ``+1`` (default, the
            paper's ``P[(i+1) mod k, i] = 1``: row ``i`` receives row ``i - 1``) or ``-1`` (the official
            CNN code's ``cat(x[1:], x[:1])``: row ``i`` receives row ``i + 1``).
        matrix: the ``k x k`` quality matrix ``Q`` (``dense`` only); ``M = I + Q``.
        std, mean, strength: Gaussian noise ``x + strength * N(mean, std)``.
        p: salt-and-pepper probability in ``[0, 1]``; ``low``/``high``: its values (give the pixel range
            for ``position='image'``); where not given, ``value_range`` says where they come from:
            ``sample`` (default) each sample's own detached minimum / maximum, ``batch`` the whole
            batch's (the official latent-level rule; batch-dependent, so at evaluation it needs
            ``allow_batch_dependence=True``), both over the non-prefix elements.
        layer: index of the block the noise sits in; negative counts from the end (``-1``: last).
        position: ``block_input`` (the residual stream entering block ``layer``), ``attn_input``
            (the LayerNorm-1 output inside block ``layer``, as the official ViT code), ``attn_output``
            (the attention output ``softmax(q k^T) v`` of block ``layer``, heads merged, before the
            output projection: ``M`` mixes query tokens; fused into the attention kernel by
            :func:`~noisynn_kernels.swap_fused_ops`) or ``image`` (the model input).
        train, eval: apply the noise in training mode / in eval mode.
        straight_through: forward ``M x``, gradient the identity (linear kinds).
        allow_batch_dependence: explicit opt-in to batch-dependent noise with ``eval=True``: ``axis='batch'``
            mixing, or salt-and-pepper with ``value_range='batch'``.
        check_matrix: validate ``I + Q`` (invertible, row dominance); ``False`` overrides.
        seed: seed of the random kinds' own generator (``None``: the global RNG).

    The config validates itself on construction and raises :class:`~noisynn_kernels.ConfigError`,
    :class:`~noisynn_kernels.QualityMatrixError` or :class:`~noisynn_kernels.BatchDependenceError`.
    """

    kind: str = "optimal"
    axis: str = "tokens"
    alpha: float = quality.DEFAULT_ALPHA
    shift: int = 1
    matrix: torch.Tensor | None = None
    std: float = 1.0
    mean: float = 0.0
    strength: float = 0.1
    p: float = 0.1
    low: float | None = None
    high: float | None = None
    value_range: str = "sample"
    layer: int = -1
    position: str = "block_input"
    train: bool = True
    eval: bool = True
    straight_through: bool = False
    allow_batch_dependence: bool = False
    check_matrix: bool = True
    seed: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.axis not in AXES:
            raise ConfigError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.position not in POSITIONS:
            raise ConfigError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ConfigError(f"layer must be an int block index (negative counts from the end), got {self.layer!r}")
        for name in ("train", "eval", "straight_through", "allow_batch_dependence", "check_matrix"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        set_("alpha", number("alpha", self.alpha, lo=0.0, hi=1.0))
        set_("shift", shift_direction(self.shift))
        set_("std", number("std", self.std, lo=0.0))
        set_("mean", number("mean", self.mean))
        set_("strength", number("strength", self.strength))
        set_("p", number("p", self.p, lo=0.0, hi=1.0))
        for name in ("low", "high"):
            if getattr(self, name) is not None:
                set_(name, number(name, getattr(self, name)))
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ConfigError(f"low must be <= high, got low = {self.low}, high = {self.high}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an int or None, got {self.seed!r}")

        if self.kind == "dense":
            if self.matrix is None:
                raise ConfigError("kind='dense' needs matrix=Q, a k x k quality matrix")
            q = quality.as_square(self.matrix, "matrix")
            # Finiteness is checked even with check_matrix=False: the override is for the paper's conditions.
            quality.validate(torch.eye(q.shape[0], dtype=torch.float64) + q.detach().double().cpu(),
                             dominance=self.check_matrix, invertible=self.check_matrix)
            set_("matrix", q)
        elif self.matrix is not None:
            raise ConfigError(f"matrix is only used with kind='dense', got kind={self.kind!r} and a matrix")
        if self.kind == "shift" and self.check_matrix and self.alpha > 0.5:
            quality.check_structured("shift", 2, self.alpha)  # raises the dominance error, for any k >= 2
        if self.kind in RANDOM_KINDS and self.straight_through:
            raise ConfigError(f"straight_through applies to linear transform noise, not kind={self.kind!r}")
        if self.value_range not in VALUE_RANGES:
            raise ConfigError(f"value_range must be one of {VALUE_RANGES}, got {self.value_range!r}")
        if self.mixes_batch and self.eval and not self.allow_batch_dependence:
            raise BatchDependenceError(f"NoiseConfig(kind={self.kind!r}, axis='batch', eval=True): "
                                       + BATCH_DEPENDENCE_MESSAGE)
        if self.batch_dependent and self.eval and not self.allow_batch_dependence:
            raise BatchDependenceError(
                "NoiseConfig(kind='salt_and_pepper', value_range='batch', eval=True): taking low / high from the "
                "whole batch at inference makes every prediction depend on the other samples in its batch. Pass "
                "allow_batch_dependence=True to ask for it explicitly, set eval=False, give low and high, or keep "
                "value_range='sample' (each sample's own range).")

    # ----------------------------------------------------------------------------------------------
    @property
    def is_linear(self) -> bool:
        """True for linear transform noise (``identity``, ``shift``, ``optimal``, ``dense``)."""
        return self.kind in quality.LINEAR_KINDS

    @property
    def is_random(self) -> bool:
        """True for the random kinds (``gaussian``, ``salt_and_pepper``)."""
        return self.kind in RANDOM_KINDS

    @property
    def mixes_batch(self) -> bool:
        """True for linear noise that mixes the samples of the batch (``axis='batch'``, not identity)."""
        return self.is_linear and self.kind != "identity" and self.axis == "batch"

    @property
    def batch_dependent(self) -> bool:
        """True when the noise makes a sample's output depend on the rest of its batch: batch-axis mixing,
        or salt-and-pepper taking a value it was not given from the whole batch (``value_range='batch'``)."""
        takes_batch_range = (self.kind == "salt_and_pepper" and self.value_range == "batch"
                             and (self.low is None or self.high is None))
        return self.mixes_batch or takes_batch_range

    def active(self, training: bool) -> bool:
        """Whether the noise is applied in training (``True``) or eval (``False``) mode."""
        return self.train if training else self.eval

    def replace(self, **changes: Any) -> NoiseConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Fields as a plain dict (``matrix`` as a nested list), e.g. for JSON result files."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if d["matrix"] is not None:
            d["matrix"] = d["matrix"].tolist()
        return d

    def __eq__(self, other) -> bool:
        if not isinstance(other, NoiseConfig):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                        and torch.equal(a.cpu(), b.cpu().to(a.dtype))):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # mutable tensor field: not hashable

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def coerce(cls, value: Any) -> NoiseConfig | None:
        """A NoiseConfig from ``None`` (no noise), a NoiseConfig, a dict of fields or a kind name."""
        if value is None or isinstance(value, NoiseConfig):
            return value
        if isinstance(value, str):
            return cls(kind=value)
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ConfigError(f"unknown NoiseConfig fields {sorted(unknown)}; expected some of "
                                  f"{[f.name for f in dataclasses.fields(cls)]}")
            return cls(**value)
        raise ConfigError(f"noise must be a NoiseConfig, a dict of its fields, a kind name or None, "
                          f"got {type(value).__name__}")

    @classmethod
    def official_vit(cls, **overrides: Any) -> NoiseConfig:
        """The official NoisyViT protocol: optimal Q across the *batch* on the LayerNorm-1 output of the
        last block, off in training and on at evaluation.  Batch-dependent at inference: it raises
        :class:`~noisynn_kernels.BatchDependenceError` unless ``allow_batch_dependence=True`` is passed."""
        fields = dict(kind="optimal", axis="batch", position="attn_input", layer=-1, train=False, eval=True)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def official_vit_salt_and_pepper(cls, p: float = 0.1, **overrides: Any) -> NoiseConfig:
        """The official NoisyViT salt-and-pepper ("impulse") noise: on the LayerNorm-1 output of the last
        block, each patch element becomes the batch's maximum with probability ``p / 2`` and its minimum
        with probability ``p / 2`` (``u < p/2``: salt, ``u > 1 - p/2``: pepper), both detached and taken
        over the patch tokens of the whole batch (``value_range='batch'``; the class token is neither
        replaced nor part of the range).  The official scripts pass ``p`` as their ``strength``.  Off in
        training and on at evaluation, like :meth:`official_vit`; the batch-wide range is batch-dependent,
        so it raises unless ``allow_batch_dependence=True`` (or ``eval=False``, or given ``low`` / ``high``)."""
        fields = dict(kind="salt_and_pepper", p=p, value_range="batch", position="attn_input", layer=-1,
                      train=False, eval=True)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def official_cnn(cls, **overrides: Any) -> NoiseConfig:
        """The official NoisyResNet protocol, as its model code computes it: shift noise of strength 0.4
        across the *batch* at the input of stage 4, block 3 (``layer4[2]``: ``layer=-1`` on ResNet-34 /
        50 / 101 / 152, whose ``layer4`` has three blocks), on in training and evaluation.  Sample ``b``
        receives ``x_{b+1}`` (the official ``cat(x[1:], x[:1])``, so ``shift=-1``) and the difference is
        added detached (``x + a * (shifted - x).detach()``, so ``straight_through=True``: the gradient
        with respect to the input is the identity).

        ResNet-18's ``layer4`` has two blocks, so the official default (block index 2) adds no noise
        there; this preset's ``layer=-1`` puts it at ResNet-18's last block instead (pass
        ``layer=...`` or apply no noise to match the official ResNet-18 run).  Batch-dependent at
        inference: it raises unless ``allow_batch_dependence=True`` (or ``eval=False``) is passed."""
        fields = dict(kind="shift", alpha=0.4, shift=-1, straight_through=True, axis="batch", position="block_input",
                      layer=-1, train=True, eval=True)
        fields.update(overrides)
        return cls(**fields)
