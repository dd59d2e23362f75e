"""Triton kernels of the fused residual add + ``(I + Q)`` mix + LayerNorm.

Layout: every tensor is a contiguous ``(B * N, D)`` matrix of rows (the launcher makes it so); a
row is one token of one sample, ``row = b * N + n``, and one program owns whole rows of ``D`` in a
single ``BLOCK_D = next_power_of_2(D)`` block (masked, so any ``D`` works).

The three mixing axes are one problem with different strides.  Patch token ``p = n - P`` (``P``
prefix tokens are never mixed) of sample ``b`` sits at position ``i`` of group ``g`` of ``K`` rows
that are ``stride`` rows apart:

======== =================== ========================== ========= ====================
axis     i                   g                           stride    K
======== =================== ========================== ========= ====================
tokens   ``p``               ``b``                       1         ``N - P``
rows     ``p // gw``         ``b * gw + p % gw``         ``gw``    ``gh``
batch    ``b``               ``p``                       ``N``     ``B``
======== =================== ========================== ========= ====================

(tokens is rows with ``STEP = 1``; the launcher passes ``STEP = gw`` for rows).  The row of position
``j`` of a group is ``row - i * stride + j * stride``.

Every kernel mixes a *source* row, recomputed on the fly from the kernel's inputs (``SRC``):

- ``SRC_SUM``: ``s = x + residual`` (forward, mix before the norm);
- ``SRC_NORM``: ``LN(s)`` with the row's statistics recomputed (forward, ``mix_after_norm``);
- ``SRC_GRAD``: the incoming gradient ``dy`` (backward, ``mix_after_norm``);
- ``SRC_LN_GRAD``: ``LN-backward(dy) + d_residual_out`` at the saved LN input and statistics
  (backward, mix before the norm).

Mixing ``KIND``: ``identity``; ``shift`` reads one partner row ``(i + shift_off) mod K`` (a shift
of direction ``s``, row ``i`` reading row ``i - s``: forward ``shift_off = (K - s) mod K``; backward
``M^T`` reads ``i + s``, ``shift_off = (K + s) mod K``); ``optimal`` adds the
group's column sum from :func:`group_sum_kernel` (``M`` is symmetric, so backward is the same);
``dense`` loops over the ``K`` rows of the group with the ``K x K`` matrix (``M``, or ``M^T`` in
backward).  All arithmetic is fp32; outputs are stored in their tensor's dtype.
"""

import triton
import triton.language as tl

# mixing kinds and axes (the ops pass the codes as ints)
from ._codes import AXIS_BATCH, IDENTITY, OPTIMAL, SHIFT

# What a mixed row is made of.
SRC_SUM = tl.constexpr(0)
SRC_NORM = tl.constexpr(1)
SRC_GRAD = tl.constexpr(2)
SRC_LN_GRAD = tl.constexpr(3)


@triton.jit
def _ln_stats(v, mask, D, eps):
    """Mean, 1/std and the centred row (zero on padding) of an fp32 row that is zero on padding."""
    mean = tl.sum(v, axis=0) / D
    diff = tl.where(mask, v - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd, diff


@triton.jit
def _source_row(row, cols, mask, D, eps, X, RES, W, BIAS, RIN, MEAN, RSTD,
                SRC: tl.constexpr, HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row ``row`` of the source being mixed, in fp32, zero on padding.

    ``X``/``RES``: ``x``/``residual`` (SUM, NORM) or ``dy``/``d_residual_out`` (GRAD, LN_GRAD);
    ``RIN``, ``MEAN``, ``RSTD``: the saved LN input and statistics (LN_GRAD only).
    """
    off = tl.cast(row, tl.int64) * D + cols
    v = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    if SRC == SRC_LN_GRAD:
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        r = tl.load(RIN + off, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (r - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            v = v * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.sum(xhat * v, axis=0) / D
        c2 = tl.sum(v, axis=0) / D
        v = tl.where(mask, (v - (xhat * c1 + c2)) * rstd, 0.0)
        if HAS_RES:
            v += tl.load(RES + off, mask=mask, other=0.0).to(tl.float32)
    elif SRC != SRC_GRAD:
        if HAS_RES:
            v += tl.load(RES + off, mask=mask, other=0.0).to(tl.float32)
        if SRC == SRC_NORM:
            mean, rstd, diff = _ln_stats(v, mask, D, eps)
            v = diff * rstd
            if HAS_WEIGHT:
                v = v * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _mixed_row(row, cols, mask, D, eps, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
               X, RES, W, BIAS, RIN, MEAN, RSTD,
               KIND: tl.constexpr, AXIS: tl.constexpr, SRC: tl.constexpr, HAS_RES: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row ``row`` of ``M @ source`` (``M`` applied within the row's group; prefix rows unmixed)."""
    v = _source_row(row, cols, mask, D, eps, X, RES, W, BIAS, RIN, MEAN, RSTD, SRC, HAS_RES, HAS_WEIGHT, HAS_BIAS)
    if KIND != IDENTITY:
        b = row // N
        p = row % N - P
        if p >= 0:
            if AXIS == AXIS_BATCH:
                i = b
                g = p
                stride = N
            else:
                i = p // STEP
                g = b * STEP + p % STEP
                stride = STEP
            base = row - i * stride
            if KIND == SHIFT:
                partner = base + ((i + shift_off) % K) * stride
                u = _source_row(partner, cols, mask, D, eps, X, RES, W, BIAS, RIN, MEAN, RSTD,
                                SRC, HAS_RES, HAS_WEIGHT, HAS_BIAS)
                v = (1.0 - alpha) * v + alpha * u
            elif KIND == OPTIMAL:
                colsum = tl.load(COLSUM + tl.cast(g, tl.int64) * D + cols, mask=mask, other=0.0)
                v = (v + colsum) / (K + 1)
            else:
                acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                for j in range(0, K):
                    m = tl.load(MIX + i * K + j).to(tl.float32)
                    u = _source_row(base + j * stride, cols, mask, D, eps, X, RES, W, BIAS, RIN, MEAN, RSTD,
                                    SRC, HAS_RES, HAS_WEIGHT, HAS_BIAS)
                    acc += m * u
                v = acc
    return v


@triton.jit
def group_sum_kernel(OUT, X, RES, W, BIAS, RIN, MEAN, RSTD, N, P, K, STEP, D, eps,
                     AXIS: tl.constexpr, SRC: tl.constexpr, HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``OUT[g] = sum over the K rows of group g of the source`` (fp32), one program per group.

    The column sum that makes ``optimal`` O(K D): ``M s = (s + sum_j s_j) / (K + 1)``.
    """
    g = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if AXIS == AXIS_BATCH:
        base = P + g
        stride = N
    else:
        base = (g // STEP) * N + P + g % STEP
        stride = STEP
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(0, K):
        acc += _source_row(base + j * stride, cols, mask, D, eps, X, RES, W, BIAS, RIN, MEAN, RSTD,
                           SRC, HAS_RES, HAS_WEIGHT, HAS_BIAS)
    tl.store(OUT + tl.cast(g, tl.int64) * D + cols, acc, mask=mask)


@triton.jit
def mix_add_layernorm_fwd_kernel(
    X, RES, W, BIAS,            # inputs: (R, D) x, residual; (D,) weight, bias
    Y, ROUT, MEAN, RSTD,        # outputs: (R, D) normed, residual_out; (R,) fp32 mean, rstd of the LN input
    MIX, COLSUM,                # (K, K) fp32 mixing matrix (dense); (groups, D) fp32 column sums (optimal)
    n_rows, N, P, K, STEP, D, eps, alpha, shift_off, rows_per_program,
    KIND: tl.constexpr, AXIS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, MIX_AFTER_NORM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Default order: ``r = M (x + residual)``, ``y = LN(r)``.  ``MIX_AFTER_NORM``: ``r = x + residual``,
    ``y = M LN(r)``.  Stores ``y``, ``r`` (residual_out) and the mean / rstd of the LN input ``r``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        off = tl.cast(row, tl.int64) * D + cols
        if MIX_AFTER_NORM:
            r = _source_row(row, cols, mask, D, eps, X, RES, W, BIAS, X, MEAN, RSTD,
                            SRC_SUM, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS)
            mean, rstd, diff = _ln_stats(r, mask, D, eps)
            y = _mixed_row(row, cols, mask, D, eps, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                           X, RES, W, BIAS, X, MEAN, RSTD,
                           KIND, AXIS, SRC_NORM, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, BLOCK_D)
        else:
            r = _mixed_row(row, cols, mask, D, eps, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                           X, RES, W, BIAS, X, MEAN, RSTD,
                           KIND, AXIS, SRC_SUM, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, BLOCK_D)
            mean, rstd, diff = _ln_stats(r, mask, D, eps)
            y = diff * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(ROUT + off, r.to(ROUT.dtype.element_ty), mask=mask)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


@triton.jit
def mix_add_layernorm_bwd_kernel(
    DY, DRES, RIN, W, MEAN, RSTD,   # (R, D) d_normed, d_residual_out, saved LN input (= residual_out)
    DX,                             # output (R, D): gradient wrt x (and residual)
    DW_PART, DB_PART,               # outputs (programs, D) fp32 per-program partials of dweight, dbias
    MIX, COLSUM,                    # (K, K) fp32 M^T (dense); (groups, D) fp32 column sums (optimal)
    n_rows, N, P, K, STEP, D, alpha, shift_off, rows_per_program,
    KIND: tl.constexpr, AXIS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    MIX_AFTER_NORM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Default order: ``g = LN-backward(dy) + d_residual_out`` (the gradient wrt ``r = M s``), and
    ``ds = M^T g``.  ``MIX_AFTER_NORM``: ``dz = M^T dy``, ``ds = LN-backward(dz) + d_residual_out``.
    ``dweight``/``dbias`` partials are the sums over this program's rows of ``dz * xhat`` / ``dz``
    (``dz = dy`` in the default order)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        off = tl.cast(row, tl.int64) * D + cols
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        r = tl.load(RIN + off, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (r - mean) * rstd, 0.0)
        if MIX_AFTER_NORM:
            dz = _mixed_row(row, cols, mask, D, 0.0, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                            DY, DRES, W, W, RIN, MEAN, RSTD,
                            KIND, AXIS, SRC_GRAD, False, HAS_WEIGHT, False, BLOCK_D)
            if HAS_WEIGHT:
                wdz = dz * w
            else:
                wdz = dz
            c1 = tl.sum(xhat * wdz, axis=0) / D
            c2 = tl.sum(wdz, axis=0) / D
            ds = (wdz - (xhat * c1 + c2)) * rstd
            if HAS_DRES:
                ds += tl.load(DRES + off, mask=mask, other=0.0).to(tl.float32)
        else:
            dz = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
            ds = _mixed_row(row, cols, mask, D, 0.0, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                            DY, DRES, W, W, RIN, MEAN, RSTD,
                            KIND, AXIS, SRC_LN_GRAD, HAS_DRES, HAS_WEIGHT, False, BLOCK_D)
        dw_acc += dz * xhat
        db_acc += dz
        tl.store(DX + off, ds.to(DX.dtype.element_ty), mask=mask)
    part = tl.cast(pid, tl.int64) * D + cols
    tl.store(DW_PART + part, dw_acc, mask=mask)
    tl.store(DB_PART + part, db_acc, mask=mask)
