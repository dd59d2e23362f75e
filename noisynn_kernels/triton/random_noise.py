"""Triton kernels of the random (harmful) noises, drawing from Philox inside the kernel.

Random numbers are a pure function of ``(seed, element index)``, so the noise is the same for the
same seed whatever the block size or launch, and backward regenerates a salt-and-pepper mask from
the seed instead of reading one from memory.  Inputs are contiguous; for ``(B, N, D)`` tokens the
first ``PREFIX`` tokens of each sample are left unchanged (``TOKEN_NUMEL = D``, ``N_TOKENS = N``);
feature maps pass ``PREFIX = 0``.

The stream is pinned here, not left to the Triton version (``tl.rand`` on int64 offsets splits its
counter differently from Triton 3.4 on): element ``e`` takes output ``e mod 4`` of Philox4x32-10 at
counter ``(e div 4 mod 2^32, e div 4 div 2^32, 0, 0)`` under key ``(seed mod 2^32, seed div 2^32)``,
so one Philox evaluation serves four elements.  A uniform is the output's top 24 bits times 2^-24
(in ``[0, 1)``); a normal is Box-Muller of lanes 0 and 1 (and of 2 and 3): ``r = sqrt(-2 ln u_a)``
with ``u_a = (top 24 bits of lane 0 + 1) * 2^-24`` (in ``(0, 1]``), lane 0 ``r cos(2 pi u_b)``, lane 1
``r sin(2 pi u_b)``.

The key and the counter start come from the launch (``seed``, offset 0: an eager call) or, with
``KEYED``, from a device tensor ``KEY = [seed, offset]`` (int64) the kernel reads: element ``e`` then
takes counter ``offset + e div 4``.  Under CUDA-graph capture the launcher passes a ``KEY`` that a
captured device op advances after each launch, so every replay of the graph draws new numbers
(a seed baked into the graph would replay the same noise).  ``seed`` is not specialized
(``do_not_specialize``): a new seed per call does not compile a new variant.
"""

import triton
import triton.language as tl

_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
_TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _philox4x32(seed, counter):
    """Philox4x32-10 at ``(counter lo, counter hi, 0, 0)`` (``counter``: uint64 block) under the 64-bit
    ``seed``: four uint32 blocks."""
    s = seed.to(tl.uint64)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(_PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = _c2 * _PHILOX_ROUND_B
        c3 = _c0 * _PHILOX_ROUND_A
        k0 = k0 + _PHILOX_KEY_A
        k1 = k1 + _PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def _uniform(r):
    """``[0, 1)`` from the top 24 bits of a uint32 block (exact in fp32)."""
    return (r >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _lanes(a, b, c, d):
    """``[a0, b0, c0, d0, a1, b1, ...]``: the four outputs of each Philox evaluation in element order."""
    return tl.interleave(tl.interleave(a, c), tl.interleave(b, d))


@triton.jit
def _key(seed, KEY, KEYED: tl.constexpr):
    """``(seed, counter offset)`` as uint64: the launch's ``seed`` and 0, or (``KEYED``) ``KEY[0]``, ``KEY[1]``."""
    if KEYED:
        s = tl.load(KEY).to(tl.uint64)
        offset = tl.load(KEY + 1).to(tl.uint64)
    else:
        s = seed.to(tl.uint64)
        offset = s * 0
    return s, offset


@triton.jit
def _counters(offset, pid, BLOCK: tl.constexpr):
    """The Philox counters of the ``BLOCK`` elements from ``pid * BLOCK`` on (four elements a counter)."""
    return offset + pid.to(tl.uint64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.uint64)


@triton.jit
def _block_uniform(seed, offset, pid, BLOCK: tl.constexpr):
    """Uniforms of the ``BLOCK`` elements from ``pid * BLOCK`` on (``BLOCK`` a multiple of 4)."""
    r0, r1, r2, r3 = _philox4x32(seed, _counters(offset, pid, BLOCK))
    return _lanes(_uniform(r0), _uniform(r1), _uniform(r2), _uniform(r3))


@triton.jit
def _block_normal(seed, offset, pid, BLOCK: tl.constexpr):
    """Standard normals of the ``BLOCK`` elements from ``pid * BLOCK`` on: Box-Muller of lanes (0, 1), (2, 3)."""
    r0, r1, r2, r3 = _philox4x32(seed, _counters(offset, pid, BLOCK))
    ra = tl.sqrt(-2.0 * tl.log(((r0 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08))
    rb = tl.sqrt(-2.0 * tl.log(((r2 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08))
    ta = _TWO_PI * _uniform(r1)
    tb = _TWO_PI * _uniform(r3)
    return _lanes(ra * tl.cos(ta), ra * tl.sin(ta), rb * tl.cos(tb), rb * tl.sin(tb))


@triton.jit
def _is_prefix(offs, TOKEN_NUMEL, N_TOKENS, PREFIX: tl.constexpr):
    if PREFIX > 0:
        return ((offs // TOKEN_NUMEL) % N_TOKENS) < PREFIX
    return offs < 0  # all False


@triton.jit(do_not_specialize=["seed"])
def gaussian_noise_kernel(x_ptr, out_ptr, key_ptr, numel, seed, mean, std, strength, TOKEN_NUMEL, N_TOKENS,
                          PREFIX: tl.constexpr, KEYED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    s, offset = _key(seed, key_ptr, KEYED)
    z = _block_normal(s, offset, pid, BLOCK)
    y = x.to(tl.float32) + strength * (mean + std * z)
    y = tl.where(_is_prefix(offs, TOKEN_NUMEL, N_TOKENS, PREFIX), x.to(tl.float32), y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def salt_and_pepper_kernel(x_ptr, out_ptr, low_ptr, high_ptr, key_ptr, numel, seed, p, TOKEN_NUMEL, N_TOKENS,
                           SAMPLE_NUMEL, LOW_STRIDE, HIGH_STRIDE, PREFIX: tl.constexpr, KEYED: tl.constexpr,
                           BLOCK: tl.constexpr):
    # low / high: one value (stride 0) or one per sample (stride 1; SAMPLE_NUMEL elements a sample)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    sample = offs // SAMPLE_NUMEL
    low = tl.load(low_ptr + sample * LOW_STRIDE, mask=mask, other=0.0)
    high = tl.load(high_ptr + sample * HIGH_STRIDE, mask=mask, other=0.0)
    s, offset = _key(seed, key_ptr, KEYED)
    u = _block_uniform(s, offset, pid, BLOCK)
    keep = _is_prefix(offs, TOKEN_NUMEL, N_TOKENS, PREFIX)
    y = tl.where(u < p * 0.5, high.to(x.dtype), tl.where(u > 1.0 - p * 0.5, low.to(x.dtype), x))
    y = tl.where(keep, x, y)
    tl.store(out_ptr + offs, y, mask=mask)


@triton.jit(do_not_specialize=["seed"])
def salt_and_pepper_backward_kernel(dy_ptr, dx_ptr, key_ptr, numel, seed, p, TOKEN_NUMEL, N_TOKENS,
                                    PREFIX: tl.constexpr, KEYED: tl.constexpr, BLOCK: tl.constexpr):
    # The gradient passes where the element was kept; the mask is regenerated from the seed.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    s, offset = _key(seed, key_ptr, KEYED)
    u = _block_uniform(s, offset, pid, BLOCK)
    replaced = (u < p * 0.5) | (u > 1.0 - p * 0.5)
    replaced = replaced & (~_is_prefix(offs, TOKEN_NUMEL, N_TOKENS, PREFIX))
    tl.store(dx_ptr + offs, tl.where(replaced, tl.zeros_like(dy), dy), mask=mask)
