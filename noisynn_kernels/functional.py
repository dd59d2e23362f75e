"""The public ops: every NoisyNN noise and the fused ops, with their arguments checked once.

Each function checks its arguments (:mod:`noisynn_kernels._validate`; errors say what was given and
what was expected), picks the backend (:func:`noisynn_kernels._ext.select_backend`, among the
backends the op has) and calls that backend's launcher from the op's table in
:mod:`noisynn_kernels.ops`.  The semantics of each fused op are documented once, in its package.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from . import quality, reference
from ._checks import VALUE_RANGES, shift_direction
from ._ext import requested_backend_token, select_backend
from ._validate import (
    AXES,
    MixSpec,
    call_key,
    check_activation,
    check_generator,
    check_mix_add_layernorm,
    check_noisy_attention,
    check_prefix,
    flag,
    mix_geometry,
    mixed_size,
    number,
)
from .errors import ConfigError, QualityMatrixError
from .ops import mix_add_layernorm as _mix_add_layernorm_op
from .ops import noisy_attention as _noisy_attention_op
from .ops import random_noise as _random_noise_op
from .ops.common import autocast_cast, autocast_off

__all__ = [
    "AXES",
    "mix_add_layernorm",
    "noisy_attention",
    "linear_transform_noise",
    "gaussian_noise",
    "salt_and_pepper_noise",
    "mixed_size",
    "backend_for",
]

_TABLES = {
    "mix_add_layernorm": _mix_add_layernorm_op.LAUNCHERS,
    "noisy_attention": _noisy_attention_op.LAUNCHERS,
    **_random_noise_op.LAUNCHERS,
}


def backend_for(op: str, device_type: str, backend: str | None = None) -> str:
    """The backend that runs ``op`` (``mix_add_layernorm``, ``noisy_attention``, ``gaussian`` or
    ``salt_and_pepper``) on ``device_type`` when ``backend`` is asked for (``None``: automatic), by the
    rules of :func:`noisynn_kernels._ext.select_backend` over the backends in the op's table."""
    return select_backend(device_type, backend, supported=tuple(_TABLES[op]), op=op)


def _device_type(t) -> str:
    """``t``'s device type (``cpu`` for a non-tensor, which the op's checks then reject).  ``is_cpu`` /
    ``is_cuda`` read a flag, where ``t.device`` builds a ``torch.device`` and ``isinstance(t, torch.Tensor)``
    goes through the tensor metaclass: a few microseconds of every call at small shapes."""
    try:
        return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type
    except AttributeError:
        return "cpu"


def linear_transform_noise(x: torch.Tensor, kind: str = "optimal", *, axis: str = "tokens",
                           alpha: float = quality.DEFAULT_ALPHA, matrix: torch.Tensor | None = None,
                           prefix_tokens: int = 0, grid: Sequence[int] | None = None,
                           straight_through: bool = False, check: bool = True, shift: int = 1) -> torch.Tensor:
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
        shift: direction of ``shift``: ``+1`` (the paper's ``P[(i+1) mod k, i] = 1``: row ``i`` receives
            row ``i - 1``) or ``-1`` (the official CNN code's ``cat(x[1:], x[:1])``: row ``i + 1``).

    Returns:
        A tensor of ``x``'s shape, dtype and device.  ``shift`` and ``optimal`` cost O(k d).
    """
    check_activation(x)
    prefix_tokens = check_prefix(x, prefix_tokens)
    if kind not in quality.LINEAR_KINDS:
        raise ConfigError(f"kind must be one of {quality.LINEAR_KINDS} for linear transform noise, got {kind!r}")
    flag("straight_through", straight_through)
    flag("check", check)
    shift = shift_direction(shift)
    k, grid = mix_geometry(x, axis, prefix_tokens, grid)
    M = None
    if kind == "dense":
        M = quality.mixing_matrix("dense", k, matrix=matrix)
        if check:
            quality.validate(M)
        elif not torch.isfinite(M).all():
            raise QualityMatrixError("dense quality matrix has non-finite entries; expected finite values")
    else:
        alpha = quality.check_alpha(alpha)
        if check:
            quality.check_structured(kind, k, alpha)
    with autocast_off(x):
        return reference.linear_transform_noise(x, kind, axis=axis, alpha=alpha, M=M, prefix_tokens=prefix_tokens,
                                                grid=grid, straight_through=straight_through, shift=shift)


def _check_seed(generator, seed) -> None:
    if seed is None:
        return
    if generator is not None:
        raise ConfigError("pass either seed or generator, not both")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")


def gaussian_noise(x: torch.Tensor, *, std: float = 1.0, mean: float = 0.0, strength: float = 0.1,
                   prefix_tokens: int = 0, generator: torch.Generator | None = None, seed: int | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """Gaussian noise ``x + strength * N(mean, std)`` elementwise (harmful noise; official defaults).

    Prefix tokens (class / register) are untouched.  The same ``generator`` state, or the same
    ``seed`` (not both), gives the same noise.  ``backend``: ``reference`` (``torch.randn``),
    ``triton`` (one fused kernel drawing Philox noise; CUDA, or CPU under ``TRITON_INTERPRET=1``), or
    ``None``: ``triton`` on CUDA, ``reference`` elsewhere (see :mod:`noisynn_kernels.ops.random_noise`).
    """
    name = backend_for("gaussian", _device_type(x), backend)
    check_activation(x)
    prefix_tokens = check_prefix(x, prefix_tokens)
    check_generator(x, generator)
    _check_seed(generator, seed)
    std = number("std", std, lo=0.0)
    mean = number("mean", mean)
    strength = number("strength", strength)
    return _random_noise_op.GAUSSIAN[name](x, std=std, mean=mean, strength=strength, prefix_tokens=prefix_tokens,
                                           generator=generator, seed=seed)


def salt_and_pepper_noise(x: torch.Tensor, p: float, *, low: float | None = None, high: float | None = None,
                          value_range: str = "sample", prefix_tokens: int = 0,
                          generator: torch.Generator | None = None, seed: int | None = None,
                          backend: str | None = None) -> torch.Tensor:
    """Salt-and-pepper ("impulse") noise: with probability ``p`` an element becomes ``high`` or ``low``
    (``p/2`` each).

    ``low``/``high``: the values, or ``None`` for the detached extremes by the ``value_range`` rule,
    taken over the elements the noise may replace (prefix tokens excluded): ``'sample'`` (default)
    each sample's own minimum / maximum, so no sample's output depends on the others; ``'batch'``
    the whole batch's (the official latent-level rule: each output then depends on the other samples,
    which at evaluation :class:`~noisynn_kernels.NoiseConfig` lets through only with
    ``allow_batch_dependence=True``).  Pass the valid pixel range at the image level.  Prefix tokens
    are untouched.  ``generator`` / ``seed`` / ``backend`` as for :func:`gaussian_noise` (the fused
    backward regenerates the mask from the seed).
    """
    name = backend_for("salt_and_pepper", _device_type(x), backend)
    check_activation(x)
    prefix_tokens = check_prefix(x, prefix_tokens)
    check_generator(x, generator)
    _check_seed(generator, seed)
    p = number("p", p, lo=0.0, hi=1.0)
    low = None if low is None else number("low", low)
    high = None if high is None else number("high", high)
    if low is not None and high is not None and low > high:
        raise ConfigError(f"low must be <= high, got low = {low}, high = {high}")
    if value_range not in VALUE_RANGES:
        raise ConfigError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
    return _random_noise_op.SALT_AND_PEPPER[name](x, p, low=low, high=high, value_range=value_range,
                                                  prefix_tokens=prefix_tokens, generator=generator, seed=seed)


# The checked calls of mix_add_layernorm with the backend each one chose: a call site calls with the same
# argument metadata every step, so it picks its backend and runs its checks once and later calls cost one
# key (_validate.call_key: everything the checks read) and a lookup, about 2 us against 10-15 us of
# checks and backend choice.  For the C++ backends an entry also holds the registered op and the trailing
# arguments its launcher built (ops.mix_add_layernorm.direct_call; not for dense, whose matrix is looked
# up each call), so a hit calls the op straight away: 6-10 us over the raw op at (2, 17, 64) instead of
# ~14, and at (8, 197, 192), where each Python object touched after the op is a cache miss, 14-22 us
# instead of 20-38.  Keyed by the call's metadata, the backend asked for and NOISYNN_BACKEND
# (read each call: a changed preference takes effect at once); an entry holds a weak reference to the
# config, never the config (a deleted config, with its dense matrix and the device copy cached for it,
# must go).  Which backends exist is fixed for a process; the launcher still refuses a backend that cannot
# run.  Failed calls are never kept; the table is bounded; traced calls (torch.compile), tensor subclasses
# and arguments of other types always run the checks.
_PLANS: dict = {}
_PLANS_MAX = 512


def mix_add_layernorm(x: torch.Tensor, residual: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, eps: float = 1e-6, *, mix=None, prefix_tokens: int = 0,
                      grid: Sequence[int] | None = None, mix_after_norm: bool = False,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + ``(I + Q)`` mix + LayerNorm in one op: returns ``(normed, residual_out)``.

    ``s = x + residual`` (or ``x``).  By default ``residual_out = M s`` and ``normed = LN(residual_out)``
    (noise in the residual stream entering a block); with ``mix_after_norm=True`` ``residual_out = s``
    and ``normed = M LN(s)`` (the official ViT position, the LayerNorm-1 output).  Full semantics:
    :mod:`noisynn_kernels.ops.mix_add_layernorm`.

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
            compiled C++ / CUDA kernels), or ``None`` for the device's default
            (:func:`noisynn_kernels.backend_info`).  An unavailable backend raises
            :class:`~noisynn_kernels.BackendUnavailableError`.
    """
    key = call_key(x, residual, weight, bias, eps, mix, prefix_tokens, grid, mix_after_norm)
    if key is not None and (backend is None or type(backend) is str):
        key = (key, backend, requested_backend_token())
        plan = _PLANS.get(key)
        if plan is not None and (mix is None or plan[0]() is mix):
            direct = plan[3]
            if direct is not None:
                out = direct[0](x, residual, weight, bias, *direct[1])
                return out[0], out[1]
            spec = plan[2] if mix is None else MixSpec(mix, *plan[2])
            return _mix_add_layernorm_op.LAUNCHERS[plan[1]](x, residual, weight, bias, eps, spec, mix_after_norm)
    else:
        key = None
    name = backend_for("mix_add_layernorm", _device_type(x), backend)
    spec = check_mix_add_layernorm(x, residual, weight, bias, eps, mix, prefix_tokens, grid, mix_after_norm)
    out = _mix_add_layernorm_op.LAUNCHERS[name](x, residual, weight, bias, eps, spec, mix_after_norm)
    if key is not None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        # the config by weak reference (spec.cfg is mix: a hit rebuilds the spec from mix and the rest);
        # for the C++ backends also the op call itself (the launcher's checks have just passed)
        direct = _mix_add_layernorm_op.direct_call(name, x, eps, spec, mix_after_norm)
        _PLANS[key] = ((None, name, spec, direct) if mix is None
                       else (weakref.ref(mix), name, tuple(spec[1:]), direct))
    return out


def noisy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mix=None, scale: float | None = None,
                    prefix_tokens: int = 0, grid: Sequence[int] | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Attention with linear transform noise on its output: ``M softmax(q k^T * scale) v``.

    ``M = I + Q`` mixes the query tokens of the ``(B, H, N, Dh)`` output: ``axis='tokens'`` the patch
    tokens of each sample (the same ``M`` for every head), ``'rows'`` the rows of the patch grid,
    ``'batch'`` the samples at each head and token.  The first ``prefix_tokens`` tokens are never
    mixed.  ``mix=None`` is plain attention, equal to ``F.scaled_dot_product_attention(q, k, v,
    scale=scale)``.  Full semantics: :mod:`noisynn_kernels.ops.noisy_attention`.

    Args:
        q, k, v: ``(B, H, N, Dh)`` tensors of one shape, dtype and device (any strides); under autocast
            they are first cast as autocast casts the inputs of ``F.scaled_dot_product_attention``.
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
    name = backend_for("noisy_attention", _device_type(q), backend)
    q, k, v = autocast_cast(q, k, v)  # under autocast, as SDPA: e.g. fp32 q / k (qk_norm) with fp16 v
    spec, scale = check_noisy_attention(q, k, v, mix, scale, prefix_tokens, grid)
    return _noisy_attention_op.LAUNCHERS[name](q, k, v, scale, spec)
