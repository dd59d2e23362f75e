"""Noisy attention benchmark: the fused op against SDPA followed by the public-code noise, and SDPA alone.

Competitors, timed interleaved in one process (:func:`~noisynn_kernels.bench.timing.measure_interleaved`)
on the same inputs:

- ``noisynn``: :func:`noisynn_kernels.functional.noisy_attention` (``triton`` on CUDA: flash attention
  with the mix pass; on CPU the ``reference`` path, SDPA then the O(k d) mix);
- ``eager``: ``F.scaled_dot_product_attention`` then the noise as public NoisyViT code writes it on the
  ``(B, N, C)`` output (class token split, permutes, dense ``k x k`` product, add, concatenation);
- ``sdpa``: ``F.scaled_dot_product_attention`` alone, no noise (the floor).

Rows have the layout of :mod:`noisynn_kernels.bench.runner` rows (``benchmark``, ``name``, the
configuration, ``competitors`` with median, spread and round-by-round speed-ups, and the
environment).  The Triton kernels are never timed on CPU: without CUDA they exist only in Triton's
interpreter, which is correct but orders of magnitude slow; such a row says so under ``skipped``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from .. import quality
from .._ext import triton_interpreted
from ..config import NoiseConfig
from ..functional import backend_for, noisy_attention
from .eager import eager_linear_noise
from .environment import environment
from .timing import Timing, measure_interleaved

__all__ = ["bench_attention", "attention_competitors"]

DEFAULT_SHAPES = ((8, 12, 197, 64),)  # ViT-B/16 at 224: batch 8, 12 heads, 1 + 14 * 14 tokens, Dh 64


def _grid(n_patches: int):
    gh = int(n_patches ** 0.5)
    while n_patches % gh:
        gh -= 1
    return gh, n_patches // gh


def _triton_skip_reason(device: torch.device, backend: str) -> str | None:
    if backend != "triton" or device.type == "cuda":
        return None
    if triton_interpreted():
        return ("not timed: on CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1), which is "
                "correct but far too slow to time")
    return "not timed: the Triton kernels need a CUDA device"


def attention_competitors(device: torch.device, dtype: torch.dtype, shape: Sequence[int], kind: str, axis: str,
                          mode: str, backend: str | None = None, prefix_tokens: int = 1):
    """``(fns, config, skipped)``: the competitors as zero-argument callables over one set of inputs,
    the row's configuration fields, and ``{competitor: why}`` for those not timed."""
    B, H, N, Dh = shape
    C = H * Dh
    n_patches = N - prefix_tokens
    grid = _grid(n_patches) if axis == "rows" else None
    k = {"tokens": n_patches, "rows": grid[0] if grid else 0, "batch": B}[axis]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, kk, v = (torch.randn(B, H, N, Dh, generator=g).to(device, dtype) for _ in range(3))
    gy = torch.randn(B, H, N, Dh, generator=g).to(device, dtype)
    Q = (quality.mixing_matrix(kind, k) - torch.eye(k, dtype=torch.float64)).to(device, dtype)
    mix = NoiseConfig(kind=kind, axis=axis, allow_batch_dependence=True)
    name = backend_for("noisy_attention", device.type, backend)
    backward = mode == "forward+backward"
    if backward:
        for t in (q, kk, v):
            t.requires_grad_(True)

    def ours():
        return noisy_attention(q, kk, v, mix=mix, prefix_tokens=prefix_tokens, grid=grid, backend=name)

    def eager():
        o = F.scaled_dot_product_attention(q, kk, v)
        t = eager_linear_noise(o.transpose(1, 2).reshape(B, N, C), Q, axis, prefix_tokens, grid)
        return t.reshape(B, N, H, Dh).transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(q, kk, v)

    def call(fn):
        if not backward:
            def run():
                with torch.no_grad():
                    fn()
            return run

        def run_bwd():
            fn().backward(gy)
            for t in (q, kk, v):
                t.grad = None
        return run_bwd

    skipped = {}
    fns = {"eager": call(eager), "sdpa": call(sdpa)}
    why = _triton_skip_reason(device, name)
    if why is None:
        fns = {"noisynn": call(ours), **fns}
    else:
        skipped["noisynn"] = why
    cfg = {"op": "noisy_attention", "kind": kind, "axis": axis, "mode": mode, "shape": [B, H, N, Dh],
           "dtype": str(dtype).replace("torch.", ""), "backend": name, "prefix_tokens": prefix_tokens}
    return fns, cfg, skipped


def _row(name: str, config: dict, timings: dict[str, Timing], baselines: Iterable[str], env: dict,
         skipped: dict[str, str]) -> dict:
    comps = {}
    for comp, t in timings.items():
        comps[comp] = {"median_ms": t.median * 1e3, "spread": t.spread, "repeats": len(t.times),
                       "speedup_vs": {b: t.ratio_to(timings[b]) for b in baselines if b != comp and b in timings}}
    row = {"benchmark": "attention", "name": name, **config, "competitors": comps, **env}
    if skipped:
        row["skipped"] = dict(skipped)
    return row


def bench_attention(device, dtype=torch.float16, shapes: Iterable[Sequence[int]] = DEFAULT_SHAPES, warmup: int = 2,
                    iters: int = 10, *, kinds: Sequence[str] = ("optimal", "shift"), axes: Sequence[str] = ("tokens",),
                    modes: Sequence[str] = ("forward", "forward+backward"), backend: str | None = None,
                    prefix_tokens: int = 1) -> list[dict]:
    """Time noisy attention against SDPA + eager noise and SDPA alone; one row per shape, kind, axis
    and mode (``forward`` under ``no_grad``, or ``forward+backward``).

    ``device`` is a ``torch.device`` or its name; ``shapes`` are ``(B, H, N, Dh)``; ``backend`` as in
    :func:`~noisynn_kernels.functional.noisy_attention` (``None``: ``triton`` on CUDA, ``reference`` on
    CPU).  Ratios are taken round by round; absolute times mean something on a GPU only.
    """
    device = torch.device(device)
    env = environment(device)
    rows = []
    for shape in shapes:
        for kind in kinds:
            for axis in axes:
                for mode in modes:
                    fns, cfg, skipped = attention_competitors(device, dtype, shape, kind, axis, mode, backend,
                                                              prefix_tokens)
                    timings = measure_interleaved(fns, warmup=warmup, iters=iters, device=device)
                    rows.append(_row(f"noisy_attention/{kind}/{axis}", cfg, timings, ("eager", "sdpa"), env, skipped))
    return rows
