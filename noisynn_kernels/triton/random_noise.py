"""Triton kernels of the random (harmful) noises, drawing from Philox inside the kernel.

Random numbers are a pure function of ``(seed, element index)``, so the noise is the same for the
same seed whatever the block size or launch, and backward regenerates a salt-and-pepper mask from
the seed instead of reading one from memory.  Inputs are contiguous; for ``(B, N, D)`` tokens the
first ``PREFIX`` tokens of each sample are left unchanged (``TOKEN_NUMEL = D``, ``N_TOKENS = N``);
feature maps pass ``PREFIX = 0``.
"""

import triton
import triton.language as tl


@triton.jit
def _is_prefix(offs, TOKEN_NUMEL, N_TOKENS, PREFIX: tl.constexpr):
    if PREFIX > 0:
        return ((offs // TOKEN_NUMEL) % N_TOKENS) < PREFIX
    return offs < 0  # all False


@triton.jit
def gaussian_noise_kernel(x_ptr, out_ptr, numel, seed, mean, std, strength, TOKEN_NUMEL, N_TOKENS,
                          PREFIX: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    z = tl.randn(seed, offs)
    y = x.to(tl.float32) + strength * (mean + std * z)
    y = tl.where(_is_prefix(offs, TOKEN_NUMEL, N_TOKENS, PREFIX), x.to(tl.float32), y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def salt_and_pepper_kernel(x_ptr, out_ptr, low_ptr, high_ptr, numel, seed, p, TOKEN_NUMEL, N_TOKENS,
                           PREFIX: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    low = tl.load(low_ptr)
    high = tl.load(high_ptr)
    u = tl.rand(seed, offs)
    keep = _is_prefix(offs, TOKEN_NUMEL, N_TOKENS, PREFIX)
    y = tl.where(u < p * 0.5, high.to(x.dtype), tl.where(u > 1.0 - p * 0.5, low.to(x.dtype), x))
    y = tl.where(keep, x, y)
    tl.store(out_ptr + offs, y, mask=mask)


@triton.jit
def salt_and_pepper_backward_kernel(dy_ptr, dx_ptr, numel, seed, p, TOKEN_NUMEL, N_TOKENS,
                                    PREFIX: tl.constexpr, BLOCK: tl.constexpr):
    # The gradient passes where the element was kept; the mask is regenerated from the seed.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    u = tl.rand(seed, offs)
    replaced = (u < p * 0.5) | (u > 1.0 - p * 0.5)
    replaced = replaced & (~_is_prefix(offs, TOKEN_NUMEL, N_TOKENS, PREFIX))
    tl.store(dx_ptr + offs, tl.where(replaced, tl.zeros_like(dy), dy), mask=mask)
