"""Public functional API of the NoisyNN noises, with argument checking.

Arguments are checked here, once, with errors that say what was given and what was expected; the
computation is the reference implementation in :mod:`noisynn_kernels.reference`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from . import quality, reference
from .errors import ConfigError, QualityMatrixError, ShapeError

__all__ = [
    "AXES",
    "linear_transform_noise",
    "gaussian_noise",
    "salt_and_pepper_noise",
    "resolve_grid",
    "mixed_size",
]

#: Axes along which linear transform noise can mix.
AXES = ("batch", "tokens", "rows")


def check_activation(x, name: str = "x") -> torch.Tensor:
    """``x`` must be a floating-point ``(B, N, D)`` or ``(B, C, H, W)`` tensor with at least one element."""
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ShapeError(f"{name} must be (B, N, D) tokens or (B, C, H, W) feature maps, got shape {tuple(x.shape)} "
                         f"(rank {x.dim()})")
    if not x.is_floating_point():
        raise ShapeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ShapeError(f"{name} is empty (shape {tuple(x.shape)}); expected every dimension >= 1")
    return x


def check_prefix(x: torch.Tensor, prefix_tokens) -> int:
    """Validate ``prefix_tokens`` for ``x``: 0 for feature maps, ``0 <= P < N`` for tokens."""
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise ConfigError(f"prefix_tokens must be an int >= 0, got {prefix_tokens!r}")
    if x.dim() == 4 and prefix_tokens:
        raise ConfigError(f"prefix_tokens must be 0 for (B, C, H, W) feature maps, got {prefix_tokens}")
    if x.dim() == 3 and prefix_tokens >= x.shape[1]:
        raise ShapeError(f"prefix_tokens = {prefix_tokens} leaves no patch tokens in x of shape {tuple(x.shape)}; "
                         f"expected prefix_tokens < N = {x.shape[1]}")
    return prefix_tokens


def resolve_grid(n_patches: int, grid: Optional[Sequence[int]]) -> Tuple[int, int]:
    """The ``(gh, gw)`` grid of ``n_patches`` tokens: ``grid`` checked against it, or inferred when square."""
    if grid is None:
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ShapeError(f"axis='rows' needs grid=(gh, gw) for {n_patches} patch tokens: "
                             f"{n_patches} is not a square, so the grid cannot be inferred")
        return side, side
    try:
        gh, gw = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ConfigError(f"grid must be a pair (gh, gw) of ints, got {grid!r}") from None
    if gh < 1 or gw < 1 or gh * gw != n_patches:
        raise ShapeError(f"grid {tuple(grid)} does not match the {n_patches} patch tokens: "
                         f"expected gh * gw = {n_patches}")
    return gh, gw


def mixed_size(x: torch.Tensor, axis: str, prefix_tokens: int = 0, grid=None) -> int:
    """``k``, the number of rows that ``axis`` mixes in ``x``."""
    return _mix_geometry(x, axis, prefix_tokens, grid)[0]


def _mix_geometry(x, axis, prefix_tokens, grid):
    if axis not in AXES:
        raise ConfigError(f"axis must be one of {AXES}, got {axis!r}")
    if x.dim() == 3 and axis == "rows":
        grid = resolve_grid(x.shape[1] - prefix_tokens, grid)
    elif grid is not None and x.dim() == 4:
        raise ConfigError("grid applies to (B, N, D) tokens only; a (B, C, H, W) feature map is mixed along H")
    return reference.mixed_view_shape(x.shape, axis, prefix_tokens, grid)[1], grid


def linear_transform_noise(x: torch.Tensor, kind: str = "optimal", *, axis: str = "tokens",
                           alpha: float = quality.DEFAULT_ALPHA, matrix: Optional[torch.Tensor] = None,
                           prefix_tokens: int = 0, grid: Optional[Sequence[int]] = None,
                           straight_through: bool = False, check: bool = True) -> torch.Tensor:
    """Linear transform noise ``X' = (I + Q) X`` (NoisyNN's positive noise).

    Args:
        x: ``(B, N, D)`` tokens or ``(B, C, H, W)`` feature maps (any float dtype, any strides).
        kind: ``identity``, ``shift`` (``Q = -a I + a P``), ``optimal`` (``M = (I + 1 1^T)/(k+1)``) or
            ``dense`` (``Q = matrix``).
        axis: what the ``k`` mixed rows are: ``batch`` (the B samples), ``tokens`` (the N - prefix patch
            tokens of a sample; the H*W positions of a feature map) or ``rows`` (the ``gh`` rows of the
            patch grid; the H rows of a feature map).
        alpha: strength ``a`` of ``shift``, in ``[0, 1]``.
        matrix: the ``k x k`` quality matrix ``Q`` for ``dense`` (not ``I + Q``).
        prefix_tokens: leading class / register tokens, passed through unchanged.
        grid: ``(gh, gw)`` patch grid for ``axis='rows'``; inferred when the patch count is square.
        straight_through: forward value ``M x``, gradient the identity (official CNN code).
        check: validate ``I + Q`` (invertible, row dominance) and raise
            :class:`~noisynn_kernels.QualityMatrixError` naming the broken condition; ``False`` is the
            explicit override for experiments outside the paper's conditions.

    Returns:
        A tensor of ``x``'s shape, dtype and device.  ``shift`` and ``optimal`` cost O(k d).
    """
    check_activation(x)
    prefix_tokens = check_prefix(x, prefix_tokens)
    if kind not in quality.LINEAR_KINDS:
        raise ConfigError(f"kind must be one of {quality.LINEAR_KINDS} for linear transform noise, got {kind!r}")
    k, grid = _mix_geometry(x, axis, prefix_tokens, grid)
    M = None
    if kind == "dense":
        M = quality.mixing_matrix("dense", k, matrix=matrix)
        if check:
            quality.validate(M)
        elif not torch.isfinite(M).all():
            raise QualityMatrixError("dense quality matrix has non-finite entries; expected finite values")
    else:
        alpha = quality._check_alpha(alpha)
        if check:
            quality.check_structured(kind, k, alpha)
    return reference.linear_transform_noise(x, kind, axis=axis, alpha=alpha, M=M, prefix_tokens=prefix_tokens,
                                            grid=grid, straight_through=straight_through)


def _check_generator(x: torch.Tensor, generator) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ConfigError(f"generator is on {generator.device} but x is on {x.device}; expected the same device type")


def _finite(name, value, *, lo=-math.inf, hi=math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ConfigError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
    return v


def gaussian_noise(x: torch.Tensor, *, std: float = 1.0, mean: float = 0.0, strength: float = 0.1,
                   prefix_tokens: int = 0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gaussian noise ``x + strength * N(mean, std)`` elementwise (harmful noise; official defaults).

    Prefix tokens (class / register) are untouched.  The same ``generator`` state gives the same noise.
    """
    check_activation(x)
    prefix_tokens = check_prefix(x, prefix_tokens)
    _check_generator(x, generator)
    std = _finite("std", std, lo=0.0)
    mean = _finite("mean", mean)
    strength = _finite("strength", strength)
    return reference.gaussian_noise(x, std=std, mean=mean, strength=strength, prefix_tokens=prefix_tokens,
                                    generator=generator)


def salt_and_pepper_noise(x: torch.Tensor, p: float, *, low: Optional[float] = None, high: Optional[float] = None,
                          prefix_tokens: int = 0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Salt-and-pepper ("impulse") noise: with probability ``p`` an element becomes ``high`` or ``low``
    (``p/2`` each).

    ``low``/``high`` default to the detached minimum/maximum of the whole batch tensor (official
    latent-level behaviour); pass the valid pixel range at the image level.  Prefix tokens untouched.
    """
    check_activation(x)
    prefix_tokens = check_prefix(x, prefix_tokens)
    _check_generator(x, generator)
    p = _finite("p", p, lo=0.0, hi=1.0)
    low = None if low is None else _finite("low", low)
    high = None if high is None else _finite("high", high)
    if low is not None and high is not None and low > high:
        raise ConfigError(f"low must be <= high, got low = {low}, high = {high}")
    return reference.salt_and_pepper_noise(x, p, low=low, high=high, prefix_tokens=prefix_tokens, generator=generator)
