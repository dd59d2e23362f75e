"""The Triton ops ``noisynn::noisy_attention_fwd`` / ``noisynn::noisy_attention_bwd`` and the ``triton``
launcher.  Semantics: :mod:`noisynn_kernels.ops.noisy_attention`.  The ``N x N`` score matrix is
never stored (flash attention: online softmax over key tiles, logsumexp saved for backward).

Passes (kernels in ``triton/attention.py``):

forward
    1. ``attn_fwd_kernel``: ``O`` and ``LSE``; for ``optimal`` on ``tokens``/``rows`` it also stores
       fp32 per-tile column sums of ``O`` (phase 1), which are added here in a fixed order (phase 2).
       Without a mix ``O`` is the result and this is the only pass.
    2. ``optimal`` on ``batch`` only: ``group_sum_kernel`` sums ``O`` over the batch per head and token.
    3. ``mix_kernel``: ``Y = M O`` in one row-wise pass (``shift``: one partner row, across tiles;
       ``optimal``: ``(o_i + colsum) / (k + 1)``; ``dense``: the ``k`` members).
backward
    1. ``optimal`` only: ``group_sum_kernel`` on ``dY``.
    2. ``mix_kernel``: ``dO = M^T dY`` and ``delta = rowsum(dO * O)``; without a mix (or with
       ``straight_through``) only ``delta`` is computed and ``dO = dY``.
    3. ``attn_bwd_dkdv_kernel`` and ``attn_bwd_dq_kernel``: the flash-attention backward from ``LSE``,
       each gradient element written by one program (no atomics): deterministic.

The mixed rows of a query tile belong to other tiles (the shift partner of a tile's first row, the
whole group for ``optimal`` and ``dense``, other samples for ``batch``), so the mix is a separate
memory-bound pass over ``O`` rather than part of the tile loop; the column sums ``optimal`` needs are
taken from the fp32 accumulators in the attention epilogue.

Layout: ``Y`` and the saved ``O`` are ``(B, H, N, Dh)`` views of ``(B, N, H, Dh)`` buffers, the
layout the output projection reads (``y.transpose(1, 2).reshape(B, N, H * Dh)`` is free).  ``q, k, v``
are read with their own strides (a copy only when the last stride is not 1).  ``dq, dk, dv`` are
contiguous.  fp32 accumulation everywhere; outputs in the inputs' dtype.

"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..._op_codes import AXIS_CODES, KIND_CODES
from ..._validate import MixSpec
from ...errors import ShapeError
from ...triton import attention as kernels
from ..common import check_triton_device, device_guard, mix_args

__all__ = ["noisy_attention_fwd", "noisy_attention_bwd", "launch", "MAX_HEAD_DIM", "INTERPRETED", "SUPPORTED_DTYPES",
           "Tiles", "tiles", "fp32_dot_precision"]


#: Largest head dim of the kernels (one block of the head dim per tile).
MAX_HEAD_DIM = 128

#: Whether the kernels run in Triton's CPU interpreter (decided when triton.jit wrapped them).
INTERPRETED = type(kernels.attn_fwd_kernel).__name__ == "InterpretedFunction"

#: Input dtypes the Triton kernels take (no bf16 under the interpreter).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------
# launch geometry


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


class Tiles(NamedTuple):
    """The launch configuration of one attention kernel: ``BLOCK_M`` (query rows), ``BLOCK_N`` (key rows),
    ``num_warps``, ``num_stages``."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


#: Tiles under Triton's interpreter: small, so several tiles (and tile boundaries) even at small N.
_INTERPRETER_TILES = Tiles(32, 32, 4, 1)


def fp32_dot_precision() -> str:
    """``DOT_PRECISION`` of fp32 attention: ``tf32`` (tensor cores) where PyTorch lets fp32 matmuls use TF32
    (``torch.backends.cuda.matmul.fp32_precision``, which the legacy ``allow_tf32`` and
    ``torch.set_float32_matmul_precision`` also set; ``none`` defers to ``torch.backends.fp32_precision``),
    else ``ieee``: full fp32 accuracy, PyTorch's default."""
    matmul = torch.backends.cuda.matmul
    try:
        prec = matmul.fp32_precision
    except AttributeError:  # a torch before the fp32_precision API
        return "tf32" if matmul.allow_tf32 else "ieee"
    if prec == "none":
        prec = getattr(torch.backends, "fp32_precision", "ieee")
    return "tf32" if prec == "tf32" else "ieee"


def _dot_precision(dtype: torch.dtype) -> str:
    # fp16 / bf16 dots run on tensor cores whatever the precision (it only changes fp32 dots)
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"


# Tiles per pass, sized with `noisynn kernels` (registers, spills, shared memory on sm_80 and sm_90; see
# benchmarks/kernels/README.md) so that no variant spills.  fp32 with ieee dots runs on FMA units, whose
# dot layouts hold more of each operand per thread than tensor-core layouts: small tiles.  The backward
# keeps two fp32 accumulators (dK, dV) per key tile, so dK/dV has tiles of its own.
_FWD_TILES = {
    "ieee": lambda bd: Tiles(32, 16, 8, 1),
    "tf32": lambda bd: Tiles(64, 32, 4, 2),
    "half": lambda bd: Tiles(128, 64, 8, 2) if bd <= 64 else Tiles(64, 64, 4, 2),
}
_DKDV_TILES = {
    "ieee": lambda bd: Tiles(16, 32, 4, 1),
    "tf32": lambda bd: Tiles(32, 32, 4, 2),
    "half": lambda bd: Tiles(64, 128, 8, 2) if bd <= 64 else Tiles(64, 64, 8, 2),
}
_DQ_TILES = {
    "ieee": lambda bd: Tiles(32, 32, 4, 1) if bd <= 64 else Tiles(32, 16, 4, 1),
    "tf32": lambda bd: Tiles(64, 32, 4, 2),
    "half": lambda bd: Tiles(128, 64, 8, 2) if bd <= 64 else Tiles(64, 64, 4, 2),
}


def tiles(kernel: str, dtype: torch.dtype, block_d: int, precision: str) -> Tiles:
    """The :class:`Tiles` of ``kernel`` (``fwd``, ``dkdv`` or ``dq``) for inputs of ``dtype``, head block
    ``block_d`` and fp32 dot ``precision`` (``ieee`` / ``tf32``; ignored for fp16 / bf16)."""
    if INTERPRETED:
        return _INTERPRETER_TILES
    table = {"fwd": _FWD_TILES, "dkdv": _DKDV_TILES, "dq": _DQ_TILES}[kernel]
    return table[precision if dtype == torch.float32 else "half"](block_d)


def _geometry(B: int, N: int, axis: int, prefix_tokens: int, grid_w: int) -> Tuple[int, int]:
    """``(K, GW)``: rows mixed per group, and the patch-grid width (1 unless axis is rows)."""
    n_patches = N - prefix_tokens
    if axis == AXIS_CODES["tokens"]:
        return n_patches, 1
    if axis == AXIS_CODES["rows"]:
        return n_patches // grid_w, grid_w
    return B, 1


def _groups(B: int, H: int, N: int, axis: int, prefix_tokens: int, gw: int) -> int:
    if axis == AXIS_CODES["batch"]:
        return H * (N - prefix_tokens)
    return B * H * gw


#: CUDA's limit on grid axes 1 and 2 (axis 0 goes to 2^31 - 1).
MAX_GRID_YZ = 65535


def _grid(bh: int, tiles: int) -> Tuple[int, int]:
    """The launch grid of a per-(batch, head) kernel: ``B * H`` on axis 0, which has room for it (ViT-B has
    12 heads: axis 1 would overflow from batch 5462 on), and the tiles along the tokens on axis 1."""
    if tiles > MAX_GRID_YZ:
        raise ShapeError(f"N is too large for the triton noisy_attention: {tiles} tiles along the tokens exceed "
                         f"CUDA's grid limit of {MAX_GRID_YZ}")
    return bh, tiles


def _strides(t: Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _new_bnhd(B: int, H: int, N: int, D: int, like: Tensor) -> Tensor:
    """A ``(B, H, N, D)`` view of a fresh ``(B, N, H, D)`` buffer."""
    return like.new_empty((B, N, H, D)).transpose(1, 2)


def _group_sum(x: Tensor, axis: int, K: int, gw: int, prefix_tokens: int, groups: int) -> Tensor:
    B, H, N, D = x.shape
    out = torch.empty((groups, D), dtype=torch.float32, device=x.device)
    block_d = _block_d(D)
    wrap_triton(kernels.group_sum_kernel)[(groups,)](
        out, x, *_strides(x), H, N, prefix_tokens, K, gw, D,
        AXIS=axis, BLOCK_K=16, BLOCK_D=block_d, num_warps=4)
    return out


def _mix_rows(src: Tensor, out: Optional[Tensor], o: Optional[Tensor], delta: Optional[Tensor], kind: int, axis: int,
              alpha: float, mix: Optional[Tensor], colsum: Optional[Tensor], prefix_tokens: int, K: int, gw: int,
              shift_off: int) -> None:
    B, H, N, D = src.shape
    block_d = _block_d(D)
    block_r = 16  # >= 16: the tokens-axis dense mix is a tl.dot over BLOCK_R rows
    placeholder = src  # never written: stands in for the pointers a configuration does not use
    out_t = out if out is not None else placeholder
    o_t = o if o is not None else placeholder
    wrap_triton(kernels.mix_kernel)[_grid(B * H, triton.cdiv(N, block_r))](
        src, out_t, o_t, delta if delta is not None else placeholder,
        mix if mix is not None else placeholder, colsum if colsum is not None else placeholder,
        *_strides(src), *_strides(out_t), *_strides(o_t),
        H, N, prefix_tokens, K, gw, D, alpha, shift_off,
        KIND=kind, AXIS=axis, STORE_OUT=out is not None, WITH_DELTA=delta is not None,
        BLOCK_R=block_r, BLOCK_J=16, BLOCK_D=block_d, num_warps=4)


# --------------------------------------------------------------------------------------------------
# forward op


@triton_op("noisynn::noisy_attention_fwd", mutates_args={})
def noisy_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    kind: int,
    axis: int,
    alpha: float,
    shift: int,
    mix_matrix: Optional[Tensor],
    prefix_tokens: int,
    grid_w: int,
    straight_through: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, o, lse)``: ``y = M o`` (``(B, H, N, Dh)``, inputs' dtype), the unmixed attention output ``o``
    saved for backward (an empty tensor when ``kind`` is identity: then ``y`` is ``o``), and the fp32
    natural-log ``lse`` of shape ``(B, H, N)``.  ``mix_matrix`` is the ``K x K`` ``M = I + Q`` (``dense``
    only), ``shift`` the direction of the ``shift`` kind (row ``i`` reads row ``i - shift``).
    ``straight_through`` only changes the backward."""
    with device_guard(q):
        B, H, N, D = q.shape
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        block_d = _block_d(D)
        precision = _dot_precision(q.dtype)
        block_m, block_n, num_warps, num_stages = tiles("fwd", q.dtype, block_d, precision)
        n_tiles = triton.cdiv(N, block_m)
        K, gw = _geometry(B, N, axis, prefix_tokens, grid_w)
        identity = kind == KIND_CODES["identity"]
        optimal = kind == KIND_CODES["optimal"]

        o = _new_bnhd(B, H, N, D, q)
        lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
        partial_mode = 0
        gw_pad = 16
        part = lse  # placeholder (never written) unless the epilogue stores column partials
        if optimal and axis != AXIS_CODES["batch"]:
            partial_mode = 1 if axis == AXIS_CODES["tokens"] else 2
            gw_pad = max(16, triton.next_power_of_2(gw))
            part = torch.empty((B * H, n_tiles, gw, D), dtype=torch.float32, device=q.device)
        qk_scale = scale * 1.4426950408889634
        wrap_triton(kernels.attn_fwd_kernel)[_grid(B * H, n_tiles)](
            q, k, v, o, lse, part, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, N, prefix_tokens, gw, D, qk_scale, n_tiles,
            PARTIAL=partial_mode, GW_PAD=gw_pad, DOT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)
        if identity:
            return o, q.new_empty((0,)), lse

        colsum = None
        if optimal:
            if partial_mode:
                colsum = part.sum(dim=1).reshape(B * H * gw, D)  # phase 2: the tile partials, in a fixed order
            else:
                colsum = _group_sum(o, axis, K, gw, prefix_tokens, _groups(B, H, N, axis, prefix_tokens, gw))
        mix = None
        if kind == KIND_CODES["dense"]:
            mix = mix_matrix.to(device=q.device, dtype=torch.float32).contiguous()
        y = _new_bnhd(B, H, N, D, q)
        _mix_rows(o, y, None, None, kind, axis, alpha, mix, colsum, prefix_tokens, K, gw, (K - shift) % K)
        return y, o, lse


@noisy_attention_fwd.register_fake
def _noisy_attention_fwd_fake(q, k, v, scale, kind, axis, alpha, shift, mix_matrix, prefix_tokens, grid_w,
                              straight_through):
    B, H, N, D = q.shape
    y = _new_bnhd(B, H, N, D, q)
    o = q.new_empty((0,)) if kind == KIND_CODES["identity"] else _new_bnhd(B, H, N, D, q)
    return y, o, q.new_empty((B, H, N), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# backward op


@triton_op("noisynn::noisy_attention_bwd", mutates_args={})
def noisy_attention_bwd(
    dy: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    scale: float,
    kind: int,
    axis: int,
    alpha: float,
    shift: int,
    mix_matrix: Optional[Tensor],
    prefix_tokens: int,
    grid_w: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` (contiguous, inputs' dtype) from the gradient ``dy`` of ``y = M o``; ``o`` is the
    unmixed attention output and ``lse`` its logsumexp, as the forward op returned them.  ``kind``
    identity means ``dO = dy`` (no mix, or straight-through)."""
    with device_guard(q):
        B, H, N, D = q.shape
        q, k, v, o, dy = (_last_dim_contiguous(t) for t in (q, k, v, o, dy))
        lse = lse.contiguous()
        block_d = _block_d(D)
        precision = _dot_precision(q.dtype)
        K, gw = _geometry(B, N, axis, prefix_tokens, grid_w)
        delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
        if kind == KIND_CODES["identity"]:
            do = dy
            _mix_rows(dy, None, o, delta, kind, axis, alpha, None, None, prefix_tokens, K, gw, 1)
        else:
            colsum = None
            if kind == KIND_CODES["optimal"]:  # M is symmetric: M^T dy = (dy + colsum(dy)) / (K + 1)
                colsum = _group_sum(dy, axis, K, gw, prefix_tokens, _groups(B, H, N, axis, prefix_tokens, gw))
            mix_t = None
            if kind == KIND_CODES["dense"]:
                mix_t = mix_matrix.to(device=q.device, dtype=torch.float32).t().contiguous()
            do = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
            _mix_rows(dy, do, o, delta, kind, axis, alpha, mix_t, colsum, prefix_tokens, K, gw, (K + shift) % K)

        dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
        dk = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
        dv = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
        qk_scale = scale * 1.4426950408889634
        common = (H, N, D, scale, qk_scale)
        strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
        t = tiles("dkdv", q.dtype, block_d, precision)
        wrap_triton(kernels.attn_bwd_dkdv_kernel)[_grid(B * H, triton.cdiv(N, t.block_n))](
            q, k, v, do, lse, delta, dk, dv, *strides, *_strides(dk), *common, DOT_PRECISION=precision,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=block_d, num_warps=t.num_warps, num_stages=t.num_stages)
        t = tiles("dq", q.dtype, block_d, precision)
        wrap_triton(kernels.attn_bwd_dq_kernel)[_grid(B * H, triton.cdiv(N, t.block_m))](
            q, k, v, do, lse, delta, dq, *strides, *_strides(dq), *common, DOT_PRECISION=precision,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=block_d, num_warps=t.num_warps, num_stages=t.num_stages)
        return dq, dk, dv


@noisy_attention_bwd.register_fake
def _noisy_attention_bwd_fake(dy, q, k, v, o, lse, scale, kind, axis, alpha, shift, mix_matrix, prefix_tokens,
                              grid_w):
    shape = q.shape
    return (q.new_empty(shape), q.new_empty(shape), q.new_empty(shape))


# --------------------------------------------------------------------------------------------------
# autograd


def _setup_context(ctx, inputs, output):
    q, k, v, scale, kind, axis, alpha, shift, mix_matrix, prefix_tokens, grid_w, straight_through = inputs
    y, o, lse = output
    ctx.mark_non_differentiable(o, lse)
    identity = kind == KIND_CODES["identity"]
    ctx.save_for_backward(q, k, v, y if identity else o, lse, mix_matrix)
    # Straight-through: forward M o, gradient the identity.
    ctx.kind = KIND_CODES["identity"] if straight_through else kind
    ctx.scale, ctx.axis, ctx.alpha, ctx.shift = scale, axis, alpha, shift
    ctx.prefix_tokens, ctx.grid_w = prefix_tokens, grid_w


def _backward(ctx, dy, _do, _dlse):
    q, k, v, o, lse, mix_matrix = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(o)
    dq, dk, dv = noisy_attention_bwd(dy, q, k, v, o, lse, ctx.scale, ctx.kind, ctx.axis, ctx.alpha, ctx.shift,
                                     mix_matrix, ctx.prefix_tokens, ctx.grid_w)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None, None, None, None, None, None, None, None)


noisy_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# launcher


def launch(q: Tensor, k: Tensor, v: Tensor, scale: float, spec: MixSpec) -> Tensor:
    """The ``triton`` backend on checked arguments (adds the Triton-specific limits)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ShapeError(f"q has dtype {q.dtype}; the triton noisy_attention takes one of {SUPPORTED_DTYPES}")
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        raise ShapeError(f"head dim Dh = {D} is too large for the triton noisy_attention; expected Dh <= "
                         f"{MAX_HEAD_DIM} (use backend='reference')")
    check_triton_device(q, "q", "noisy_attention", INTERPRETED)
    y, _, _ = noisy_attention_fwd(q, k, v, float(scale), *mix_args(spec, q.device), bool(spec.cfg.straight_through))
    return y
