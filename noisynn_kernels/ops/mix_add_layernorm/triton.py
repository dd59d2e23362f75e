"""The Triton ops: ``noisynn::mix_add_layernorm_fwd`` / ``noisynn::mix_add_layernorm_bwd`` and the ``triton``
launcher.  Semantics: :mod:`noisynn_kernels.ops.mix_add_layernorm`.

The ``@triton.jit`` kernels are in ``triton/mix_layernorm.py``; here are their launchers, registered
with ``torch.library.triton_op`` (kernels launched through ``wrap_triton`` so ``torch.compile`` can
trace into them), with the fakes and the autograd formula of :mod:`.common`.

Backward grids: the row pass runs enough programs to fill the GPU by occupancy (each writes one fp32
``dweight`` / ``dbias`` partial, added in a fixed order); the ``optimal`` column sums split each group's
rows over programs (fixed slices, then a fixed-order sum of the partials); rows longer than
:data:`_BWD_MAX_BLOCK` are done in chunks, after a pass that takes the LayerNorm backward's two row sums.
Forward: one program a row; rows longer than :data:`_FWD_MAX_BLOCK` are done in chunks after a pass that
takes each row's mean and rstd.

Launcher conventions: inputs are made contiguous here (a copy for non-contiguous inputs; the
kernels index rows as ``row * D``), outputs are allocated here, never in kernels.  Statistics and
``dweight``/``dbias`` partials are fp32.  Backward recomputes ``x_hat`` from ``residual_out``: it *is*
the LayerNorm input in both orders.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..._ext import triton_interpreted
from ..._op_codes import AXIS_CODES, KIND_CODES
from ..._validate import MixSpec
from ...errors import ShapeError
from ...triton import mix_layernorm as kernels
from ..common import check_triton_device, device_guard
from .common import bwd_fake, fwd_fake, make_backward, run_fwd, setup_context

__all__ = ["launch", "mix_add_layernorm_fwd", "mix_add_layernorm_bwd", "INTERPRETED", "SUPPORTED_DTYPES"]


#: Whether the kernels run in Triton's CPU interpreter (decided when triton.jit wrapped them).
INTERPRETED = triton_interpreted()

#: Activation dtypes the Triton kernels take (no bf16 under the interpreter).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------
# launch geometry


def _geometry(B: int, N: int, axis: int, prefix_tokens: int, grid_w: int) -> Tuple[int, int, int]:
    """``(K, STEP, groups)``: mixed rows per group, token step between them (tokens/rows), group count."""
    n_patches = N - prefix_tokens
    if axis == AXIS_CODES["tokens"]:
        return n_patches, 1, B
    if axis == AXIS_CODES["rows"]:
        return n_patches // grid_w, grid_w, B * grid_w
    return B, 1, n_patches


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16


def _bwd_num_warps(block_d: int) -> int:
    """Warps of the backward kernel: it keeps about twice the forward's rows of ``BLOCK_D`` live (the row,
    its gradient, ``x_hat``, the ``dweight`` / ``dbias`` accumulators), so it spreads them over more
    threads one step earlier."""
    return 4 if block_d <= 512 else 8 if block_d <= 2048 else 16


#: Resident warps per SM the backward grid aims at (of 64 on sm_80 / sm_90: half occupancy, which a
#: memory-bound row loop needs to hide latency, within the registers a 255-register thread allows).
_TARGET_WARPS_PER_SM = 32
#: SMs assumed where the device has none to ask (``meta`` tensors of `noisynn kernels`: an H100 SXM).
_DEFAULT_SMS = 132
#: Programs of the backward under Triton's interpreter (a few: each runs one after the other on the CPU).
_INTERPRETER_PROGRAMS = 8


def _backward_programs(device: torch.device, n_rows: int, num_warps: int) -> int:
    """Programs of the backward kernel: each loops over a slice of rows and writes one fp32 partial of
    dweight / dbias (added in a fixed order afterwards), so there are enough programs to fill the GPU at
    :data:`_TARGET_WARPS_PER_SM` resident warps per SM, and no more (each program adds a partial row)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    elif device.type == "cpu":
        return max(1, min(n_rows, _INTERPRETER_PROGRAMS))
    else:
        sms = _DEFAULT_SMS
    per_sm = max(1, _TARGET_WARPS_PER_SM // num_warps)
    return max(1, min(n_rows, sms * per_sm))


#: Rows of a group one program of the column-sum pass adds (phase 1; the launcher adds the partials).
_ROWS_PER_SPLIT = 64
#: Widest block of the backward: longer rows are done in chunks of this many columns (a row of up to 16K-32K
#: elements in one block would not fit the registers of a thread block).
_BWD_MAX_BLOCK = 4096
#: Widest block of the forward (it keeps fewer rows live than the backward: one row of 8192 fits a
#: 16-warp block without spilling, 16384 does not); longer rows are done in chunks after a statistics pass.
_FWD_MAX_BLOCK = 8192


def _group_sums(groups: int, K: int, D: int, chunks: int, device: torch.device, launch) -> Tensor:
    """``(groups, D)`` fp32 column sums of the groups' source rows: ``launch(part, grid, rows_per_split)``
    runs :func:`group_sum_kernel` into ``part`` (``(groups, splits, D)``) on the grid ``(groups, splits,
    chunks)``, and the partials are then added in a fixed order."""
    rows_per_split = min(max(K, 1), _ROWS_PER_SPLIT)
    splits = triton.cdiv(max(K, 1), rows_per_split)
    part = torch.empty((groups, splits, D), dtype=torch.float32, device=device)
    launch(part, (groups, splits, chunks), rows_per_split)
    return part.sum(dim=1) if splits > 1 else part.view(groups, D)


# --------------------------------------------------------------------------------------------------
# forward op


@triton_op("noisynn::mix_add_layernorm_fwd", mutates_args={})
def mix_add_layernorm_fwd(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    kind: int,
    axis: int,
    alpha: float,
    shift: int,
    mix_matrix: Optional[Tensor],
    prefix_tokens: int,
    grid_w: int,
    mix_after_norm: bool,
    straight_through: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(normed, residual_out, mean, rstd)`` for ``(B, N, D)`` inputs; ``mean``/``rstd`` are the fp32
    statistics of the LayerNorm input, one per row of ``B * N``.  ``mix_matrix`` is the ``K x K``
    mixing matrix ``M = I + Q`` (``dense`` only), ``shift`` the direction of the ``shift`` kind (row ``i``
    reads row ``i - shift``).  ``straight_through`` only changes the backward."""
    with device_guard(x):
        B, N, D = x.shape
        n_rows = B * N
        x = x.contiguous()
        has_residual, has_weight, has_bias = residual is not None, weight is not None, bias is not None
        res = residual.contiguous() if has_residual else x
        w = weight.contiguous() if has_weight else x
        b = bias.contiguous() if has_bias else x
        normed = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
        residual_out = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
        mean = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
        rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
        if n_rows == 0 or D == 0:  # nothing to launch (an empty grid is not a valid launch)
            return normed, residual_out, mean, rstd
        K, step, groups = _geometry(B, N, axis, prefix_tokens, grid_w)
        block_d = min(triton.next_power_of_2(D), _FWD_MAX_BLOCK)
        chunks = triton.cdiv(D, block_d)
        num_warps = _num_warps(block_d)
        shift_off = (K - shift) % K

        # Placeholder pointers for unused arguments are inputs the kernel never writes (a written output
        # passed twice would look aliased to torch.compile's mutation analysis).
        colsum = x  # placeholder: read only when kind == optimal
        mix = x  # placeholder: read only when kind == dense
        if kind == KIND_CODES["dense"]:
            mix = mix_matrix.to(device=x.device, dtype=torch.float32).contiguous()

        def stats_pass():  # rows in chunks: the LayerNorm input's statistics first
            wrap_triton(kernels.ln_fwd_stats_kernel)[(n_rows,)](
                mean, rstd, x, res, w, b, mix, colsum, N, prefix_tokens, K, step, D, eps, alpha, shift_off,
                KIND=kind, AXIS=axis, HAS_RESIDUAL=has_residual, MIX_AFTER_NORM=mix_after_norm, BLOCK_D=block_d,
                num_warps=num_warps)

        # Order of the passes: with mix_after_norm the mixed source is LN(x + residual), whose statistics the
        # column sums need; in the default order the LayerNorm input M (x + residual) needs the column sums.
        if chunks > 1 and mix_after_norm:
            stats_pass()
        if kind == KIND_CODES["optimal"]:
            src = kernels.SRC_NORM.value if mix_after_norm else kernels.SRC_SUM.value

            def colsum_pass(part, grid, rows_per_split):
                wrap_triton(kernels.group_sum_kernel)[grid](
                    part, x, res, w, b, x, mean, rstd, x, N, prefix_tokens, K, step, D, eps, rows_per_split,
                    AXIS=axis, SRC=src, HAS_RES=has_residual, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
                    HAS_STATS=chunks > 1 and mix_after_norm, BLOCK_D=block_d, num_warps=num_warps)

            colsum = _group_sums(groups, K, D, chunks, x.device, colsum_pass)
        if chunks > 1 and not mix_after_norm:
            stats_pass()

        wrap_triton(kernels.mix_add_layernorm_fwd_kernel)[(n_rows,)](
            x, res, w, b, normed, residual_out, mean, rstd, mix, colsum,
            n_rows, N, prefix_tokens, K, step, D, eps, alpha, shift_off, 1,
            KIND=kind, AXIS=axis, HAS_RESIDUAL=has_residual, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
            MIX_AFTER_NORM=mix_after_norm, HAS_STATS=chunks > 1, BLOCK_D=block_d, num_warps=num_warps)
        return normed, residual_out, mean, rstd


mix_add_layernorm_fwd.register_fake(fwd_fake)


# --------------------------------------------------------------------------------------------------
# backward op


@triton_op("noisynn::mix_add_layernorm_bwd", mutates_args={})
def mix_add_layernorm_bwd(
    d_normed: Tensor,
    d_residual_out: Optional[Tensor],
    residual_out: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    kind: int,
    axis: int,
    alpha: float,
    shift: int,
    mix_matrix: Optional[Tensor],
    prefix_tokens: int,
    grid_w: int,
    mix_after_norm: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``: ``dx`` (also the gradient of ``residual``) in ``residual_out``'s dtype,
    ``dweight``/``dbias`` fp32 of shape ``(D,)`` (computed whether or not the forward had them)."""
    with device_guard(residual_out):
        B, N, D = residual_out.shape
        n_rows = B * N
        device = residual_out.device
        r = residual_out.contiguous()
        dy = d_normed.contiguous()
        has_dres, has_weight = d_residual_out is not None, weight is not None
        dres = d_residual_out.contiguous() if has_dres else dy
        w = weight.contiguous() if has_weight else dy
        dx = torch.empty((B, N, D), dtype=residual_out.dtype, device=device)
        if n_rows == 0 or D == 0:  # no rows: dweight / dbias are sums over nothing (the grid split below needs rows)
            zeros = torch.zeros((D,), dtype=torch.float32, device=device)
            return dx, zeros, zeros.clone()
        K, step, groups = _geometry(B, N, axis, prefix_tokens, grid_w)
        block_d = min(triton.next_power_of_2(D), _BWD_MAX_BLOCK)
        chunks = triton.cdiv(D, block_d)
        num_warps = _bwd_num_warps(block_d)
        optimal = kind == KIND_CODES["optimal"]
        mix_t = dy  # placeholder (never written): read only when kind == dense
        if kind == KIND_CODES["dense"]:
            mix_t = mix_matrix.to(device=device, dtype=torch.float32).t().contiguous()
        colsum = dy  # placeholder (never written): read only when kind == optimal (M is symmetric)
        stats = dy  # placeholder: the LayerNorm backward's row sums, (n_rows, 2) fp32 when rows are chunked

        def colsum_pass(part, grid, rows_per_split):
            if mix_after_norm:
                src, src_has_res = kernels.SRC_GRAD.value, False
            else:
                src, src_has_res = kernels.SRC_LN_GRAD.value, has_dres
            wrap_triton(kernels.group_sum_kernel)[grid](
                part, dy, dres, w, w, r, mean, rstd, stats, N, prefix_tokens, K, step, D, 0.0, rows_per_split,
                AXIS=axis, SRC=src, HAS_RES=src_has_res, HAS_WEIGHT=has_weight, HAS_BIAS=False,
                HAS_STATS=chunks > 1, BLOCK_D=block_d, num_warps=num_warps)

        # Order of the passes: the column sums of dz = M^T dy come first where the row sums need them
        # (mix_after_norm); the column sums of LN-backward(dy) need the row sums (default order).
        if optimal and mix_after_norm:
            colsum = _group_sums(groups, K, D, chunks, device, colsum_pass)
        if chunks > 1:
            stats = torch.empty((n_rows, 2), dtype=torch.float32, device=device)
            wrap_triton(kernels.ln_grad_stats_kernel)[(n_rows,)](
                stats, dy, r, w, mean, rstd, mix_t, colsum, N, prefix_tokens, K, step, D, alpha, (K + shift) % K,
                KIND=kind, AXIS=axis, HAS_WEIGHT=has_weight, MIX_AFTER_NORM=mix_after_norm, BLOCK_D=block_d,
                num_warps=num_warps)
        if optimal and not mix_after_norm:
            colsum = _group_sums(groups, K, D, chunks, device, colsum_pass)

        n_programs = _backward_programs(device, n_rows, num_warps)
        rows_per_program = triton.cdiv(n_rows, n_programs)
        n_programs = triton.cdiv(n_rows, rows_per_program)
        dw_part = torch.empty((n_programs, D), dtype=torch.float32, device=device)
        db_part = torch.empty((n_programs, D), dtype=torch.float32, device=device)
        wrap_triton(kernels.mix_add_layernorm_bwd_kernel)[(n_programs,)](
            dy, dres, r, w, mean, rstd, dx, dw_part, db_part, mix_t, colsum, stats,
            n_rows, N, prefix_tokens, K, step, D, alpha, (K + shift) % K, rows_per_program,
            KIND=kind, AXIS=axis, HAS_DRES=has_dres, HAS_WEIGHT=has_weight, MIX_AFTER_NORM=mix_after_norm,
            HAS_STATS=chunks > 1, BLOCK_D=block_d, num_warps=num_warps)
        return dx, dw_part.sum(dim=0), db_part.sum(dim=0)


mix_add_layernorm_bwd.register_fake(bwd_fake)


# --------------------------------------------------------------------------------------------------
# autograd


mix_add_layernorm_fwd.register_autograd(make_backward(mix_add_layernorm_bwd), setup_context=setup_context)


# --------------------------------------------------------------------------------------------------
# launcher


def launch(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
           spec: MixSpec, mix_after_norm: bool) -> Tuple[Tensor, Tensor]:
    """The ``triton`` backend on checked arguments (adds the Triton-specific limits);
    ``(normed, residual_out)``."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ShapeError(f"x has dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")
    check_triton_device(x, "x", "mix_add_layernorm", INTERPRETED)
    return run_fwd(mix_add_layernorm_fwd, x, residual, weight, bias, eps, spec, mix_after_norm)
