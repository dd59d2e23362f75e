"""The Triton random-noise ops and the ``triton`` launchers.  Semantics: :mod:`noisynn_kernels.ops.random_noise`.

- ``noisynn::gaussian_noise(x, seed, mean, std, strength, prefix_tokens)``: ``x + strength * N(mean, std)``;
  its gradient is the identity, so nothing is saved.
- ``noisynn::salt_and_pepper_noise(x, low, high, seed, p, prefix_tokens)``: no mask is stored; backward
  (``noisynn::salt_and_pepper_noise_backward``) regenerates it from the seed.

The random stream is Philox keyed by ``(seed, element index of the contiguous tensor)``: the same
seed gives the same noise on every run and launch configuration.  It is not the stream of
``torch.randn``, so the fused and reference noises agree in distribution, not element by element.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from ... import reference
from ..._ext import triton_interpreted
from ...errors import BackendUnavailableError, ShapeError
from ...triton.random_noise import gaussian_noise_kernel, salt_and_pepper_backward_kernel, salt_and_pepper_kernel
from ..common import device_guard

__all__ = ["launch_gaussian", "launch_salt_and_pepper", "triton_runs_on", "stream_state", "counters_used"]

_BLOCK = 1024

#: device -> its fused-noise stream state under CUDA graphs: int64 ``[seed, offset]`` on that device.
_STATES: Dict[torch.device, torch.Tensor] = {}


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device`` here (CUDA, or CPU under the interpreter)."""
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def _layout(x: torch.Tensor, prefix_tokens: int):
    # (TOKEN_NUMEL, N_TOKENS) tell the kernel which elements belong to prefix tokens.
    return (x.shape[2], x.shape[1]) if (x.dim() == 3 and prefix_tokens) else (1, 1)


def _grid(numel: int):
    return (triton.cdiv(numel, _BLOCK),)


def counters_used(numel: int) -> int:
    """Philox counters one launch over ``numel`` elements takes (four elements a counter, whole blocks)."""
    return triton.cdiv(numel, _BLOCK) * (_BLOCK // 4)


def _key_arg(key: Optional[torch.Tensor], x: torch.Tensor):
    """``(pointer, KEYED)``: the ``key`` tensor, or ``x`` as a placeholder the kernel does not read."""
    if key is None:
        return x, False
    if key.dtype != torch.int64 or key.numel() != 2 or key.device != x.device:
        raise ShapeError(f"key must be an int64 [seed, offset] pair on {x.device}; got {key.numel()} {key.dtype} "
                         f"values on {key.device}")
    return key, True


@triton_op("noisynn::gaussian_noise", mutates_args={})
def _gaussian_op(x: torch.Tensor, seed: int, mean: float, std: float, strength: float,
                 prefix_tokens: int, key: Optional[torch.Tensor] = None) -> torch.Tensor:
    with device_guard(x):
        out = torch.empty_like(x)
        token_numel, n_tokens = _layout(x, prefix_tokens)
        key_ptr, keyed = _key_arg(key, x)
        wrap_triton(gaussian_noise_kernel)[_grid(x.numel())](
            x, out, key_ptr, x.numel(), seed, mean, std, strength, token_numel, n_tokens, PREFIX=prefix_tokens,
            KEYED=keyed, BLOCK=_BLOCK)
        return out


# Explicit fake (meta) implementations: triton_op derives one by running the body on fake tensors,
# which works with compiled kernels but not under the Triton interpreter (it would launch the kernel).
@_gaussian_op.register_fake
def _gaussian_fake(x, seed, mean, std, strength, prefix_tokens, key=None):
    return torch.empty_like(x)


def _gaussian_backward(ctx, grad):
    return grad, None, None, None, None, None, None


_gaussian_op.register_autograd(_gaussian_backward)


@triton_op("noisynn::salt_and_pepper_noise_backward", mutates_args={})
def _salt_and_pepper_backward_op(grad: torch.Tensor, seed: int, p: float, prefix_tokens: int,
                                 key: Optional[torch.Tensor] = None) -> torch.Tensor:
    with device_guard(grad):
        grad = grad.contiguous()
        dx = torch.empty_like(grad)
        token_numel, n_tokens = _layout(grad, prefix_tokens)
        key_ptr, keyed = _key_arg(key, grad)
        wrap_triton(salt_and_pepper_backward_kernel)[_grid(grad.numel())](
            grad, dx, key_ptr, grad.numel(), seed, p, token_numel, n_tokens, PREFIX=prefix_tokens, KEYED=keyed,
            BLOCK=_BLOCK)
        return dx


@_salt_and_pepper_backward_op.register_fake
def _salt_and_pepper_backward_fake(grad, seed, p, prefix_tokens, key=None):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@triton_op("noisynn::salt_and_pepper_noise", mutates_args={})
def _salt_and_pepper_op(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, seed: int, p: float,
                        prefix_tokens: int, key: Optional[torch.Tensor] = None) -> torch.Tensor:
    with device_guard(x):
        out = torch.empty_like(x)
        token_numel, n_tokens = _layout(x, prefix_tokens)
        B = x.shape[0]
        for name, t in (("low", low), ("high", high)):
            if t.numel() not in (1, B):
                raise ShapeError(f"{name} has {t.numel()} values; expected 1 or one per sample ({B})")
        low, high = low.reshape(-1).contiguous(), high.reshape(-1).contiguous()
        key_ptr, keyed = _key_arg(key, x)
        wrap_triton(salt_and_pepper_kernel)[_grid(x.numel())](
            x, out, low, high, key_ptr, x.numel(), seed, p, token_numel, n_tokens, x.numel() // B,
            1 if low.numel() > 1 else 0, 1 if high.numel() > 1 else 0, PREFIX=prefix_tokens, KEYED=keyed,
            BLOCK=_BLOCK)
        return out


@_salt_and_pepper_op.register_fake
def _salt_and_pepper_fake(x, low, high, seed, p, prefix_tokens, key=None):
    return torch.empty_like(x)


def _salt_and_pepper_setup(ctx, inputs, output):
    _, _, _, ctx.seed, ctx.p, ctx.prefix_tokens, key = inputs
    ctx.save_for_backward(key)  # the launch's [seed, offset] (None: the seed) regenerates the mask


def _salt_and_pepper_backward(ctx, grad):
    (key,) = ctx.saved_tensors
    dx = torch.ops.noisynn.salt_and_pepper_noise_backward(grad, ctx.seed, ctx.p, ctx.prefix_tokens, key)
    return dx, None, None, None, None, None, None


_salt_and_pepper_op.register_autograd(_salt_and_pepper_backward, setup_context=_salt_and_pepper_setup)


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def stream_state(device: torch.device) -> Optional[torch.Tensor]:
    """The fused noises' stream state of ``device`` under CUDA graphs: the int64 ``[seed, offset]`` tensor the
    captured launches copy and advance, or ``None`` before the first eager call on the device."""
    return _STATES.get(torch.device(device))


def _prepare(x: torch.Tensor, generator: Optional[torch.Generator], seed: Optional[int]):
    """``(x contiguous, seed, key)``.  Eagerly: ``seed``, or one drawn from ``generator`` (or the global RNG,
    so ``torch.manual_seed`` makes runs reproducible), and ``key`` None.  Under CUDA-graph capture with no
    ``seed``: ``key``, this launch's ``[seed, offset]`` on the device (see the module docstring)."""
    if not triton_runs_on(x.device):
        raise BackendUnavailableError(
            f"the Triton noise kernels run CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported); got a tensor on {x.device}")
    x = x.contiguous()
    if seed is not None:  # an explicit seed: the same noise every call, in a graph too
        return x, seed, None
    if _capturing(x.device):
        state = _STATES.get(x.device)
        if state is None:
            raise BackendUnavailableError(
                f"the fused random noise was called under CUDA-graph capture before any eager call on {x.device}: "
                "its device stream state is made by the first eager call (run one warm-up step outside the "
                "capture first, as CUDA-graph capture needs anyway), or pass an explicit seed (the same noise "
                "on every replay)")
        key = state.clone()  # captured: this launch's [seed, offset]
        state[1:] += counters_used(x.numel())  # captured: the next launch and the next replay draw further on
        return x, 0, key
    gen_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=gen_device).item())
    if x.device not in _STATES:  # the graph stream of this device continues this call's stream
        _STATES[x.device] = torch.tensor([seed, counters_used(x.numel())], dtype=torch.int64, device=x.device)
    return x, seed, None


def launch_gaussian(x: torch.Tensor, *, std: float, mean: float, strength: float, prefix_tokens: int,
                    generator: Optional[torch.Generator], seed: Optional[int]) -> torch.Tensor:
    """The ``triton`` Gaussian noise on checked arguments: one read, one write, noise drawn in the kernel."""
    x, seed, key = _prepare(x, generator, seed)
    return _gaussian_op(x, seed, mean, std, strength, prefix_tokens, key)


def launch_salt_and_pepper(x: torch.Tensor, p: float, *, low: Optional[float], high: Optional[float],
                           value_range: str, prefix_tokens: int, generator: Optional[torch.Generator],
                           seed: Optional[int]) -> torch.Tensor:
    """The ``triton`` salt-and-pepper noise on checked arguments; ``low``/``high`` not given follow
    ``value_range`` (:func:`noisynn_kernels.reference.salt_and_pepper_range`: per sample or batch-wide,
    over the non-prefix elements), computed on the device (no host sync)."""
    x, seed, key = _prepare(x, generator, seed)
    lo = hi = None
    if low is None or high is None:
        body = x[:, prefix_tokens:] if x.dim() == 3 and prefix_tokens else x
        lo, hi = reference.salt_and_pepper_range(body, value_range)
    # torch.full, not torch.tensor: a fill on the device, no host-to-device copy (illegal under graph capture)
    lo = lo if low is None else torch.full((), low, dtype=x.dtype, device=x.device)
    hi = hi if high is None else torch.full((), high, dtype=x.dtype, device=x.device)
    return _salt_and_pepper_op(x, lo, hi, seed, p, prefix_tokens, key)
