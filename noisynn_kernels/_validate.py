"""Argument checks of the public ops and the description of one checked call (:class:`MixSpec`).

Written once and used by every layer above: the public functions in
:mod:`noisynn_kernels.functional`, the modules, and the op launchers (which receive a ``MixSpec``
and add only their backend's own limits).  Errors say what was given and what was expected.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import quality, reference
from ._checks import AXES, flag, number, traced
from .config import NoiseConfig
from .errors import ConfigError, ShapeError

__all__ = [
    "AXES",
    "MixSpec",
    "check_tensor",
    "check_activation",
    "check_prefix",
    "check_generator",
    "resolve_grid",
    "mix_geometry",
    "mixed_size",
    "call_key",
    "check_mix_add_layernorm",
    "check_noisy_attention",
    "number",
    "flag",
]


def check_tensor(x, name: str, ranks: tuple[int, ...], layout: str) -> torch.Tensor:
    """``x`` must be a non-empty floating-point tensor of one of ``ranks``; ``layout`` describes the
    expected shapes in the error."""
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        raise ShapeError(f"{name} must be {layout}, got shape {tuple(x.shape)} (rank {x.dim()})")
    if not x.is_floating_point():
        raise ShapeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ShapeError(f"{name} is empty (shape {tuple(x.shape)}); expected every dimension >= 1")
    return x


def check_activation(x, name: str = "x") -> torch.Tensor:
    """``x`` must be a floating-point ``(B, N, D)`` or ``(B, C, H, W)`` tensor with at least one element."""
    return check_tensor(x, name, (3, 4), "(B, N, D) tokens or (B, C, H, W) feature maps")


def _prefix_count(prefix_tokens) -> int:
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise ConfigError(f"prefix_tokens must be an int >= 0, got {prefix_tokens!r}")
    return prefix_tokens


def _leaves_patches(prefix_tokens: int, t: torch.Tensor, name: str, n: int) -> None:
    if prefix_tokens >= n:
        raise ShapeError(f"prefix_tokens = {prefix_tokens} leaves no patch tokens in {name} of shape "
                         f"{tuple(t.shape)}; expected prefix_tokens < N = {n}")


def check_prefix(x: torch.Tensor, prefix_tokens) -> int:
    """Validate ``prefix_tokens`` for ``x``: 0 for feature maps, ``0 <= P < N`` for tokens."""
    prefix_tokens = _prefix_count(prefix_tokens)
    if x.dim() == 4 and prefix_tokens:
        raise ConfigError(f"prefix_tokens must be 0 for (B, C, H, W) feature maps, got {prefix_tokens}")
    if x.dim() == 3:
        _leaves_patches(prefix_tokens, x, "x", x.shape[1])
    return prefix_tokens


def check_generator(x: torch.Tensor, generator) -> None:
    """``generator`` must be ``None`` or a ``torch.Generator`` on ``x``'s device type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ConfigError(f"generator is on {generator.device} but x is on {x.device}; expected the same device type")


def resolve_grid(n_patches: int, grid: Sequence[int] | None) -> tuple[int, int]:
    """The ``(gh, gw)`` grid of ``n_patches`` tokens: ``grid`` checked against it, or inferred when square."""
    if grid is None:
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ShapeError(f"axis='rows' needs grid=(gh, gw) for {n_patches} patch tokens: "
                             f"{n_patches} is not a square, so the grid cannot be inferred")
        return side, side
    try:
        # operator.index: ints (also NumPy ints, integer 0-d tensors), never a float silently truncated.
        if isinstance(grid, (str, bytes)) or any(isinstance(g, bool) for g in grid):
            raise TypeError
        gh, gw = (operator.index(g) for g in grid)
    except (TypeError, ValueError):
        raise ConfigError(f"grid must be a pair (gh, gw) of ints, got {grid!r}") from None
    if gh < 1 or gw < 1 or gh * gw != n_patches:
        raise ShapeError(f"grid {tuple(grid)} does not match the {n_patches} patch tokens: "
                         f"expected gh * gw = {n_patches}")
    return gh, gw


def _check_axis(axis) -> str:
    if axis not in AXES:
        raise ConfigError(f"axis must be one of {AXES}, got {axis!r}")
    return axis


def mix_geometry(x: torch.Tensor, axis: str, prefix_tokens: int = 0, grid=None):
    """``(k, grid)``: the number of rows ``axis`` mixes in ``x`` and the checked ``(gh, gw)`` grid
    (for ``(B, N, D)`` tokens on the ``rows`` axis; else ``grid`` as given)."""
    _check_axis(axis)
    if x.dim() == 3 and axis == "rows":
        grid = resolve_grid(x.shape[1] - prefix_tokens, grid)
    elif grid is not None and x.dim() == 4:
        raise ConfigError("grid applies to (B, N, D) tokens only; a (B, C, H, W) feature map is mixed along H")
    return reference.mixed_view_shape(x.shape, axis, prefix_tokens, grid)[1], grid


def mixed_size(x: torch.Tensor, axis: str, prefix_tokens: int = 0, grid=None) -> int:
    """``k``, the number of rows that ``axis`` mixes in ``x``."""
    return mix_geometry(x, axis, prefix_tokens, grid)[0]


class MixSpec(NamedTuple):
    """A checked mix for one call of a fused op: what every backend launches with."""

    cfg: NoiseConfig
    prefix_tokens: int
    grid: tuple[int, int] | None  # (gh, gw) for axis='rows', else None
    k: int                           # rows mixed together


# mix=None as a config, built once (NoiseConfig is frozen): constructing it costs more than every other
# check of a call together.
_IDENTITY = NoiseConfig(kind="identity")


def _linear_config(mix) -> NoiseConfig:
    if mix is None:
        return _IDENTITY
    cfg = NoiseConfig.coerce(mix)
    if cfg is None:
        return _IDENTITY
    if not cfg.is_linear:
        raise ConfigError(f"mix must be linear transform noise (kind in {quality.LINEAR_KINDS}) or None, "
                          f"got kind={cfg.kind!r}")
    return cfg


def _check_mix_size(cfg: NoiseConfig, k: int, rows: str, t: torch.Tensor, prefix_tokens: int) -> None:
    """The config's matrix must fit the ``k`` mixed rows; a shift must be valid at this ``k``."""
    if cfg.kind == "dense" and tuple(cfg.matrix.shape) != (k, k):
        raise ShapeError(f"dense quality matrix has shape {tuple(cfg.matrix.shape)}, expected ({k}, {k}): axis="
                         f"{cfg.axis!r} mixes k = {k} {rows} of shape {tuple(t.shape)} "
                         f"(prefix_tokens = {prefix_tokens})")
    if cfg.kind == "shift" and cfg.check_matrix:
        _check_shift(k, cfg.alpha)


# (k, alpha) of the shifts that passed quality.check_structured: the check is a closed form, the same
# answer for every call of a layer, so each pair is checked once (a bounded set; failures are never kept).
_SHIFTS_OK: set = set()


def _check_shift(k, alpha) -> None:
    if torch.compiler.is_compiling() or traced(k) or traced(alpha):  # (no cache inside a traced graph)
        return quality.check_structured("shift", k, alpha)
    key = (k, alpha)
    if key in _SHIFTS_OK:
        return None
    quality.check_structured("shift", k, alpha)
    if len(_SHIFTS_OK) < 1024:
        _SHIFTS_OK.add(key)
    return None


# call_key's names, bound once: it runs on every call of mix_add_layernorm, where each global and attribute
# lookup is a cache miss after an op that streamed megabytes (~4 us a call instead of ~8 at (8, 197, 192)).
_TENSOR = torch.Tensor
_PARAMETER = torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling


def call_key(x, residual, weight, bias, eps, mix, prefix_tokens, grid, mix_after_norm):
    """What :func:`check_mix_add_layernorm` reads of a call, as a dict key: the tensors' shapes, dtypes and
    devices, the numbers and the config object's identity; ``None`` for a call that is never cached
    (traced by torch.compile, a tensor subclass, arguments of other types than the checks accept, e.g. a
    0-d tensor ``eps`` that could change in place or ``True`` for an int).  The key holds the config's
    ``id`` only: a cache keyed by it must also check that the config it kept (by weak reference, so that a
    deleted config and its dense matrix can go) is still the object passed."""
    if (type(x) is not _TENSOR or (mix is not None and type(mix) is not NoiseConfig)
            or (type(eps) is not float and type(eps) is not int) or type(prefix_tokens) is not int
            or type(mix_after_norm) is not bool or _is_compiling()):
        return None
    if grid is not None and (type(grid) is not tuple or not all(type(g) is int for g in grid)):
        return None
    # residual, weight, bias: None or a plain tensor / parameter (anything else, e.g. a subclass or a list,
    # is checked every call and gets the checks' own error)
    tr, tw, tb = type(residual), type(weight), type(bias)
    if not ((residual is None or tr is _TENSOR or tr is _PARAMETER) and (weight is None or tw is _TENSOR
                                                                         or tw is _PARAMETER)
            and (bias is None or tb is _TENSOR or tb is _PARAMETER)):
        return None
    return (x.shape, x.dtype, x.device, eps, id(mix), prefix_tokens, grid, mix_after_norm,
            None if residual is None else (residual.shape, residual.dtype, residual.device),
            None if weight is None else (weight.shape, weight.dtype, weight.device),
            None if bias is None else (bias.shape, bias.dtype, bias.device))


def check_mix_add_layernorm(x, residual, weight, bias, eps, mix, prefix_tokens, grid, mix_after_norm) -> MixSpec:
    """The backend-independent checks of :func:`noisynn_kernels.mix_add_layernorm` (which runs them once per
    call site: see its call cache); the checked mix as a :class:`MixSpec`."""
    check_activation(x)
    if x.dim() != 3:
        raise ShapeError(f"x must be (B, N, D) tokens, got shape {tuple(x.shape)} (rank {x.dim()})")
    for t, tname, shape in ((residual, "residual", x.shape), (weight, "weight", x.shape[-1:]),
                            (bias, "bias", x.shape[-1:])):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"{tname} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ShapeError(f"{tname} has shape {tuple(t.shape)}, expected {tuple(shape)} to match x of shape "
                             f"{tuple(x.shape)}")
        if not t.is_floating_point():
            raise ShapeError(f"{tname} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != x.device:
            raise ShapeError(f"{tname} is on {t.device} but x is on {x.device}; expected the same device")
    if residual is not None and residual.dtype != x.dtype:
        raise ShapeError(f"residual has dtype {residual.dtype}, expected x's dtype {x.dtype}")
    if not traced(eps) and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                              or eps <= 0):
        raise ConfigError(f"eps must be a finite number > 0, got {eps!r}")
    flag("mix_after_norm", mix_after_norm)
    prefix_tokens = check_prefix(x, prefix_tokens)
    cfg = _linear_config(mix)
    k, rows_grid = mix_geometry(x, cfg.axis, prefix_tokens, grid)
    _check_mix_size(cfg, k, "rows of x", x, prefix_tokens)
    return MixSpec(cfg, prefix_tokens, rows_grid if cfg.axis == "rows" else None, k)


def check_noisy_attention(q, k, v, mix, scale, prefix_tokens, grid) -> tuple[MixSpec, float]:
    """The backend-independent checks of :func:`noisynn_kernels.noisy_attention`, done once per call:
    returns the checked mix and the softmax scale (``Dh ** -0.5`` when ``scale`` is ``None``)."""
    for t, tname in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, tname, (4,), "(B, H, N, Dh) (batch, heads, tokens, head dim)")
    for t, tname in ((k, "k"), (v, "v")):
        if tuple(t.shape) != tuple(q.shape):
            raise ShapeError(f"{tname} has shape {tuple(t.shape)}, expected q's shape {tuple(q.shape)} "
                             "(self-attention: q, k and v are (B, H, N, Dh) alike)")
        if t.dtype != q.dtype:
            raise ShapeError(f"{tname} has dtype {t.dtype}, expected q's dtype {q.dtype}")
        if t.device != q.device:
            raise ShapeError(f"{tname} is on {t.device} but q is on {q.device}; expected the same device")
    B, H, N, Dh = q.shape
    if scale is None:
        scale = Dh ** -0.5
    elif not traced(scale) and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
        raise ConfigError(f"scale must be a finite number or None (for Dh ** -0.5), got {scale!r}")
    prefix_tokens = _prefix_count(prefix_tokens)
    _leaves_patches(prefix_tokens, q, "q", N)
    cfg = _linear_config(mix)
    n_patches = N - prefix_tokens
    rows_grid = None
    if cfg.axis == "rows":
        rows_grid = resolve_grid(n_patches, grid)
        k_mix = rows_grid[0]
    elif cfg.axis == "tokens":
        k_mix = n_patches
    else:
        k_mix = B
    _check_mix_size(cfg, k_mix, "query rows of q", q, prefix_tokens)
    return MixSpec(cfg, prefix_tokens, rows_grid, k_mix), float(scale)
