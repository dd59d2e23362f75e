"""Fused random noises as ``noisynn::`` ops: Gaussian and salt-and-pepper drawn from Philox in the kernel.

- ``noisynn::gaussian_noise(x, seed, mean, std, strength, prefix_tokens)``: ``x + strength * N(mean, std)``;
  its gradient is the identity, so nothing is saved.
- ``noisynn::salt_and_pepper_noise(x, low, high, seed, p, prefix_tokens)``: no mask is stored; backward
  (``noisynn::salt_and_pepper_noise_backward``) regenerates it from the seed.

The random stream is Philox keyed by ``(seed, element index of the contiguous tensor)``: the same
seed gives the same noise on every run and launch configuration.  It is not the stream of
``torch.randn``, so the fused and reference noises agree in distribution, not element by element.

The Triton backend runs CUDA tensors, and CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``); anything else raises :class:`~noisynn_kernels.BackendUnavailableError`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from .._ext import triton_interpreted
from ..errors import BackendUnavailableError, ConfigError
from ..functional import _check_generator, _finite, check_activation, check_prefix
from ..triton.random_noise import gaussian_noise_kernel, salt_and_pepper_backward_kernel, salt_and_pepper_kernel

__all__ = ["gaussian_noise_fused", "salt_and_pepper_noise_fused", "triton_runs_on"]

_BLOCK = 1024


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device`` here (CUDA, or CPU under the interpreter)."""
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def _layout(x: torch.Tensor, prefix_tokens: int):
    # (TOKEN_NUMEL, N_TOKENS) tell the kernel which elements belong to prefix tokens.
    return (x.shape[2], x.shape[1]) if (x.dim() == 3 and prefix_tokens) else (1, 1)


def _grid(numel: int):
    return (triton.cdiv(numel, _BLOCK),)


@triton_op("noisynn::gaussian_noise", mutates_args={})
def _gaussian_op(x: torch.Tensor, seed: int, mean: float, std: float, strength: float,
                 prefix_tokens: int) -> torch.Tensor:
    out = torch.empty_like(x)
    token_numel, n_tokens = _layout(x, prefix_tokens)
    wrap_triton(gaussian_noise_kernel)[_grid(x.numel())](
        x, out, x.numel(), seed, mean, std, strength, token_numel, n_tokens, PREFIX=prefix_tokens, BLOCK=_BLOCK)
    return out


# Explicit fake (meta) implementations: triton_op derives one by running the body on fake tensors,
# which works with compiled kernels but not under the Triton interpreter (it would launch the kernel).
@_gaussian_op.register_fake
def _gaussian_fake(x, seed, mean, std, strength, prefix_tokens):
    return torch.empty_like(x)


def _gaussian_backward(ctx, grad):
    return grad, None, None, None, None, None


_gaussian_op.register_autograd(_gaussian_backward)


@triton_op("noisynn::salt_and_pepper_noise_backward", mutates_args={})
def _salt_and_pepper_backward_op(grad: torch.Tensor, seed: int, p: float, prefix_tokens: int) -> torch.Tensor:
    grad = grad.contiguous()
    dx = torch.empty_like(grad)
    token_numel, n_tokens = _layout(grad, prefix_tokens)
    wrap_triton(salt_and_pepper_backward_kernel)[_grid(grad.numel())](
        grad, dx, grad.numel(), seed, p, token_numel, n_tokens, PREFIX=prefix_tokens, BLOCK=_BLOCK)
    return dx


@_salt_and_pepper_backward_op.register_fake
def _salt_and_pepper_backward_fake(grad, seed, p, prefix_tokens):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@triton_op("noisynn::salt_and_pepper_noise", mutates_args={})
def _salt_and_pepper_op(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, seed: int, p: float,
                        prefix_tokens: int) -> torch.Tensor:
    out = torch.empty_like(x)
    token_numel, n_tokens = _layout(x, prefix_tokens)
    wrap_triton(salt_and_pepper_kernel)[_grid(x.numel())](
        x, out, low, high, x.numel(), seed, p, token_numel, n_tokens, PREFIX=prefix_tokens, BLOCK=_BLOCK)
    return out


@_salt_and_pepper_op.register_fake
def _salt_and_pepper_fake(x, low, high, seed, p, prefix_tokens):
    return torch.empty_like(x)


def _salt_and_pepper_setup(ctx, inputs, output):
    _, _, _, ctx.seed, ctx.p, ctx.prefix_tokens = inputs


def _salt_and_pepper_backward(ctx, grad):
    dx = torch.ops.noisynn.salt_and_pepper_noise_backward(grad, ctx.seed, ctx.p, ctx.prefix_tokens)
    return dx, None, None, None, None, None


_salt_and_pepper_op.register_autograd(_salt_and_pepper_backward, setup_context=_salt_and_pepper_setup)


def _prepare(x, prefix_tokens, generator, seed):
    check_activation(x)
    prefix_tokens = check_prefix(x, prefix_tokens)
    if not triton_runs_on(x.device):
        raise BackendUnavailableError(
            f"the Triton noise kernels run CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported); got a tensor on {x.device}")
    if seed is not None and generator is not None:
        raise ConfigError("pass either seed or generator, not both")
    if seed is None:
        _check_generator(x, generator)
        gen_device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=gen_device).item())
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    return x.contiguous(), prefix_tokens, seed


def gaussian_noise_fused(x: torch.Tensor, *, std: float = 1.0, mean: float = 0.0, strength: float = 0.1,
                         prefix_tokens: int = 0, generator: Optional[torch.Generator] = None,
                         seed: Optional[int] = None) -> torch.Tensor:
    """Fused Gaussian noise ``x + strength * N(mean, std)``: one read, one write, noise drawn in the kernel.

    ``seed`` fixes the noise; without it a seed is drawn from ``generator`` (or the global RNG), so
    ``torch.manual_seed`` makes runs reproducible.  Arguments as :func:`noisynn_kernels.gaussian_noise`.
    """
    x, prefix_tokens, seed = _prepare(x, prefix_tokens, generator, seed)
    std = _finite("std", std, lo=0.0)
    return _gaussian_op(x, seed, _finite("mean", mean), std, _finite("strength", strength), prefix_tokens)


def salt_and_pepper_noise_fused(x: torch.Tensor, p: float, *, low: Optional[float] = None,
                                high: Optional[float] = None, prefix_tokens: int = 0,
                                generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> torch.Tensor:
    """Fused salt-and-pepper noise; backward regenerates the mask from the seed instead of storing it.

    ``low``/``high`` default to the detached minimum/maximum of the whole tensor (computed on the device,
    no host sync).  Arguments as :func:`noisynn_kernels.salt_and_pepper_noise`, plus ``seed``.
    """
    x, prefix_tokens, seed = _prepare(x, prefix_tokens, generator, seed)
    p = _finite("p", p, lo=0.0, hi=1.0)
    xd = x.detach()
    lo = xd.amin() if low is None else torch.tensor(_finite("low", low), dtype=x.dtype, device=x.device)
    hi = xd.amax() if high is None else torch.tensor(_finite("high", high), dtype=x.dtype, device=x.device)
    if low is not None and high is not None and low > high:
        raise ConfigError(f"low must be <= high, got low = {low}, high = {high}")
    return _salt_and_pepper_op(x, lo, hi, seed, p, prefix_tokens)
