"""Public functional API of the NoisyNN noises, with argument checking.

Arguments are checked here, once, with errors that say what was given and what was expected; the
computation is the reference implementation in :mod:`noisynn_kernels.reference`.
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence, Tuple

import torch

import torch.nn.functional as F

from . import quality, reference
from ._ext import select_backend
from .errors import ConfigError, QualityMatrixError, ShapeError

if TYPE_CHECKING:
    from .config import NoiseConfig

__all__ = [
    "AXES",
    "mix_add_layernorm",
    "noisy_attention",
    "check_mix_add_layernorm",
    "MixSpec",
    "linear_transform_noise",
    "gaussian_noise",
    "salt_and_pepper_noise",
    "resolve_grid",
    "mixed_size",
]

#: Axes along which linear transform noise can mix.
AXES = ("batch", "tokens", "rows")


def _check_tensor(x, name: str, ranks: Tuple[int, ...], layout: str) -> torch.Tensor:
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
    return _check_tensor(x, name, (3, 4), "(B, N, D) tokens or (B, C, H, W) feature maps")


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
    for flag, value in (("straight_through", straight_through), ("check", check)):
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be a bool, got {value!r}")
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
    with _autocast_off(x):
        return reference.linear_transform_noise(x, kind, axis=axis, alpha=alpha, M=M, prefix_tokens=prefix_tokens,
                                                grid=grid, straight_through=straight_through)


def _check_generator(x: torch.Tensor, generator) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ConfigError(f"generator is on {generator.device} but x is on {x.device}; expected the same device type")


def _autocast_off(x: torch.Tensor):
    """Autocast disabled on ``x``'s device: a noise returns ``x``'s dtype under autocast on every
    backend (autocast would run the reference's dense ``M @ x`` in bf16/fp16 and return that dtype,
    while the fused kernels compute in fp32 and keep the input's dtype)."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def _finite(name, value, *, lo=-math.inf, hi=math.inf) -> float:
    if isinstance(value, bool):  # float(True) == 1.0 would pass silently
        raise ConfigError(f"{name} must be a number, got {value!r}")
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


class MixSpec(NamedTuple):
    """Validated arguments of :func:`mix_add_layernorm` (what every backend launches with)."""

    cfg: "NoiseConfig"
    prefix_tokens: int
    grid: Optional[Tuple[int, int]]  # (gh, gw) for axis='rows', else None
    k: int                           # rows mixed together


def check_mix_add_layernorm(x, residual, weight, bias, eps, mix, prefix_tokens, grid, mix_after_norm) -> MixSpec:
    """The backend-independent checks of :func:`mix_add_layernorm`, done once per call."""
    from .config import NoiseConfig

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
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"eps must be a finite number > 0, got {eps!r}")
    if not isinstance(mix_after_norm, bool):
        raise ConfigError(f"mix_after_norm must be a bool, got {mix_after_norm!r}")
    prefix_tokens = check_prefix(x, prefix_tokens)
    cfg = NoiseConfig.coerce(mix)
    if cfg is None:
        cfg = NoiseConfig(kind="identity")
    if not cfg.is_linear:
        raise ConfigError(f"mix must be linear transform noise (kind in {quality.LINEAR_KINDS}) or None, "
                          f"got kind={cfg.kind!r}")
    k, rows_grid = _mix_geometry(x, cfg.axis, prefix_tokens, grid)
    rows_grid = rows_grid if cfg.axis == "rows" else None
    if cfg.kind == "dense" and tuple(cfg.matrix.shape) != (k, k):
        raise ShapeError(f"dense quality matrix has shape {tuple(cfg.matrix.shape)}, expected ({k}, {k}): axis="
                         f"{cfg.axis!r} mixes k = {k} rows of x of shape {tuple(x.shape)} "
                         f"(prefix_tokens = {prefix_tokens})")
    if cfg.kind == "shift" and cfg.check_matrix:
        quality.check_structured("shift", k, cfg.alpha)
    return MixSpec(cfg, prefix_tokens, rows_grid, k)


def mix_add_layernorm(x: torch.Tensor, residual: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None, eps: float = 1e-6, *, mix=None, prefix_tokens: int = 0,
                      grid: Optional[Sequence[int]] = None, mix_after_norm: bool = False,
                      backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual add + ``(I + Q)`` mix + LayerNorm in one op: returns ``(normed, residual_out)``.

    ``s = x + residual`` (or ``x``).  By default ``residual_out = M s`` and ``normed = LN(residual_out)``
    (noise in the residual stream entering a block); with ``mix_after_norm=True`` ``residual_out = s``
    and ``normed = M LN(s)`` (the official ViT position, the LayerNorm-1 output).

    Args:
        x, residual: ``(B, N, D)`` tokens of one dtype (``residual`` may be ``None``).
        weight, bias: ``(D,)`` LayerNorm affine parameters, or ``None``.
        eps: LayerNorm epsilon, > 0.
        mix: a linear :class:`~noisynn_kernels.NoiseConfig` (``identity``, ``shift``, ``optimal``, ``dense``
            with its ``axis``, ``alpha``, ``matrix``, ``straight_through``), a dict of its fields, or ``None``
            for no mixing.  The config's ``train``/``eval`` switches are the caller's business.
        prefix_tokens: leading class / register tokens: added and normalized, never mixed.
        grid: ``(gh, gw)`` patch grid for ``axis='rows'`` (inferred when square).
        mix_after_norm: mix the LayerNorm output instead of the residual stream.
        backend: ``reference`` (PyTorch ops), ``triton`` (fused kernels; CUDA), ``cpu`` / ``cuda`` (the
            compiled C++ / CUDA kernels), or ``None`` for the device's default (:func:`noisynn_kernels.backend_info`).  An unavailable backend raises
            :class:`~noisynn_kernels.BackendUnavailableError`.
    """
    name = select_backend(x.device.type if isinstance(x, torch.Tensor) else "cpu", backend)
    spec = check_mix_add_layernorm(x, residual, weight, bias, eps, mix, prefix_tokens, grid, mix_after_norm)
    if name == "triton":
        from .ops.mix_add_layernorm import launch

        return launch(x, residual, weight, bias, eps, spec, mix_after_norm)
    if name == "cpu":
        from .ops.cpu_mix_add_layernorm import launch as cpu_launch

        return cpu_launch(x, residual, weight, bias, eps, spec, mix_after_norm)
    if name == "cuda":
        from .ops.cuda_mix_add_layernorm import launch as cuda_launch

        return cuda_launch(x, residual, weight, bias, eps, spec, mix_after_norm)
    cfg = spec.cfg
    M = quality.mixing_matrix("dense", spec.k, matrix=cfg.matrix) if cfg.kind == "dense" else None

    def apply_mix(t):
        if cfg.kind == "identity":
            return t
        return reference.linear_transform_noise(t, cfg.kind, axis=cfg.axis, alpha=cfg.alpha, M=M,
                                                prefix_tokens=spec.prefix_tokens, grid=spec.grid,
                                                straight_through=cfg.straight_through)

    D = x.shape[-1]

    def norm(t):
        # Outputs keep x's dtype whatever the dtypes of weight / bias, as on the fused backends
        # (F.layer_norm would reject e.g. fp32 x with a bf16 weight): normalize in the promoted dtype.
        dt = t.dtype
        for p in (weight, bias):
            if p is not None:
                dt = torch.promote_types(dt, p.dtype)
        if dt == t.dtype and all(p is None or p.dtype == dt for p in (weight, bias)):
            return F.layer_norm(t, (D,), weight, bias, eps)
        return F.layer_norm(t.to(dt), (D,), None if weight is None else weight.to(dt),
                            None if bias is None else bias.to(dt), eps).to(t.dtype)

    with _autocast_off(x):
        s = x if residual is None else x + residual
        if mix_after_norm:
            return apply_mix(norm(s)), s
        r = apply_mix(s)
        return norm(r), r


def check_noisy_attention(q, k, v, mix, scale, prefix_tokens, grid) -> Tuple[MixSpec, float]:
    """The backend-independent checks of :func:`noisy_attention`, done once per call: returns the
    validated mix and the softmax scale (``Dh ** -0.5`` when ``scale`` is ``None``)."""
    from .config import NoiseConfig

    for t, tname in ((q, "q"), (k, "k"), (v, "v")):
        _check_tensor(t, tname, (4,), "(B, H, N, Dh) (batch, heads, tokens, head dim)")
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
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"scale must be a finite number or None (for Dh ** -0.5), got {scale!r}")
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise ConfigError(f"prefix_tokens must be an int >= 0, got {prefix_tokens!r}")
    if prefix_tokens >= N:
        raise ShapeError(f"prefix_tokens = {prefix_tokens} leaves no patch tokens in q of shape {tuple(q.shape)}; "
                         f"expected prefix_tokens < N = {N}")
    cfg = NoiseConfig.coerce(mix)
    if cfg is None:
        cfg = NoiseConfig(kind="identity")
    if not cfg.is_linear:
        raise ConfigError(f"mix must be linear transform noise (kind in {quality.LINEAR_KINDS}) or None, "
                          f"got kind={cfg.kind!r}")
    n_patches = N - prefix_tokens
    rows_grid = None
    if cfg.axis == "rows":
        rows_grid = resolve_grid(n_patches, grid)
        k_mix = rows_grid[0]
    elif cfg.axis == "tokens":
        k_mix = n_patches
    else:
        k_mix = B
    if cfg.kind == "dense" and tuple(cfg.matrix.shape) != (k_mix, k_mix):
        raise ShapeError(f"dense quality matrix has shape {tuple(cfg.matrix.shape)}, expected ({k_mix}, {k_mix}): "
                         f"axis={cfg.axis!r} mixes k = {k_mix} query rows of q of shape {tuple(q.shape)} "
                         f"(prefix_tokens = {prefix_tokens})")
    if cfg.kind == "shift" and cfg.check_matrix:
        quality.check_structured("shift", k_mix, cfg.alpha)
    return MixSpec(cfg, prefix_tokens, rows_grid, k_mix), float(scale)


def _attention_backend(device_type: str, backend: Optional[str]) -> str:
    """Like :func:`noisynn_kernels._ext.select_backend`, for an op with Triton and reference paths only:
    the automatic choice is ``triton`` on CUDA (when Triton is there) and ``reference`` otherwise; an
    explicit ``cpu`` / ``cuda`` request (argument or ``NOISYNN_BACKEND``) raises, there are no compiled
    attention kernels."""
    from ._ext import requested_backend
    from .errors import BackendUnavailableError

    explicit = isinstance(backend, str) and backend.strip().lower() not in ("", "auto")
    explicit = explicit or requested_backend() is not None
    name = select_backend(device_type, backend)
    if name in ("cpu", "cuda"):
        if explicit:
            raise BackendUnavailableError(
                f"backend {name!r} has no noisy_attention kernels (only mix_add_layernorm is compiled); "
                "expected 'triton' (CUDA, or CPU under TRITON_INTERPRET=1), 'reference' or None")
        name = "reference"
    return name


def noisy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mix=None, scale: Optional[float] = None,
                    prefix_tokens: int = 0, grid: Optional[Sequence[int]] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Attention with linear transform noise on its output: ``M softmax(q k^T * scale) v``.

    ``M = I + Q`` mixes the query tokens of the ``(B, H, N, Dh)`` output: ``axis='tokens'`` the patch
    tokens of each sample (the same ``M`` for every head), ``'rows'`` the rows of the patch grid,
    ``'batch'`` the samples at each head and token.  The first ``prefix_tokens`` tokens are never
    mixed.  As the output projection acts per token, mixing here equals mixing the attention
    branch's output before the residual add.  ``mix=None`` is plain attention, equal to
    ``F.scaled_dot_product_attention(q, k, v, scale=scale)``.

    Args:
        q, k, v: ``(B, H, N, Dh)`` tensors of one shape, dtype and device (any strides).
        mix: a linear :class:`~noisynn_kernels.NoiseConfig` (``identity``, ``shift``, ``optimal``,
            ``dense`` with its ``axis``, ``alpha``, ``matrix``, ``straight_through``), a dict of its
            fields, a kind name, or ``None``.  Its ``train``/``eval`` switches are the caller's business.
        scale: softmax scale; ``None`` for ``Dh ** -0.5``.
        prefix_tokens: leading class / register tokens: attended to and from, never mixed.
        grid: ``(gh, gw)`` patch grid for ``axis='rows'`` (inferred when the patch count is square).
        backend: ``triton`` (flash-attention kernels with the mix pass; CUDA, or CPU under
            ``TRITON_INTERPRET=1``; ``Dh <= 128``), ``reference`` (``F.scaled_dot_product_attention``
            then :func:`noisynn_kernels.reference.linear_transform_noise`), or ``None``: ``triton`` on
            CUDA, ``reference`` elsewhere.  There are no compiled ``cpu`` / ``cuda`` attention
            kernels: asking for them raises :class:`~noisynn_kernels.BackendUnavailableError`.

    Returns:
        ``(B, H, N, Dh)`` in the inputs' dtype (from the ``triton`` backend: a view of a
        ``(B, N, H, Dh)`` buffer, so ``y.transpose(1, 2).reshape(B, N, H * Dh)`` is free).

    Raises:
        ShapeError, ConfigError, QualityMatrixError, BackendUnavailableError: with what was given and
        what was expected.
    """
    name = _attention_backend(q.device.type if isinstance(q, torch.Tensor) else "cpu", backend)
    spec, scale = check_noisy_attention(q, k, v, mix, scale, prefix_tokens, grid)
    if name == "triton":
        from .ops.noisy_attention import launch

        return launch(q, k, v, scale, spec)
    cfg = spec.cfg
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if cfg.kind == "identity":
        return o
    B, H, N, Dh = q.shape
    M = quality.mixing_matrix("dense", spec.k, matrix=cfg.matrix) if cfg.kind == "dense" else None
    t = reference.linear_transform_noise(o.transpose(1, 2).reshape(B, N, H * Dh), cfg.kind, axis=cfg.axis,
                                         alpha=cfg.alpha, M=M, prefix_tokens=spec.prefix_tokens, grid=spec.grid,
                                         straight_through=cfg.straight_through)
    return t.reshape(B, N, H, Dh).transpose(1, 2)
