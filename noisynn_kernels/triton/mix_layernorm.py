"""Triton kernels of the fused residual add + ``(I + Q)`` mix + LayerNorm.

Layout: every tensor is a contiguous ``(B * N, D)`` matrix of rows (the launcher makes it so); a
row is one token of one sample, ``row = b * N + n``, and one program owns whole rows of ``D``: in
a single ``BLOCK_D = next_power_of_2(D)`` block (masked, so any ``D`` works), or chunks of ``BLOCK_D``
columns when a row is longer than the launcher's largest block: the row statistics then come first
from their own pass (the forward's mean and rstd from :func:`ln_fwd_stats_kernel`, the LayerNorm
backward's two row sums from :func:`ln_grad_stats_kernel`) and the rest is column by column.

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

Runtime ints that take many values (``n_rows``, ``rows_per_program``, ``rows_per_split``, ``shift_off``)
are not specialized (``do_not_specialize``): they only bound loops and index rows, and specializing
them (divisibility by 16, the value 1) would compile a new variant per batch size.
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
def _source_row(row, cols, mask, D, eps, X, RES, W, BIAS, RIN, MEAN, RSTD, STATS,
                SRC: tl.constexpr, HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_STATS: tl.constexpr):
    """Columns ``cols`` of row ``row`` of the source being mixed, in fp32, zero on padding.

    ``X``/``RES``: ``x``/``residual`` (SUM, NORM) or ``dy``/``d_residual_out`` (GRAD, LN_GRAD);
    ``RIN``, ``MEAN``, ``RSTD``: the saved LN input and statistics (LN_GRAD; NORM reads ``MEAN`` / ``RSTD``).
    LN_GRAD needs two sums over the whole row (``c1``, ``c2`` of the LayerNorm backward): with ``HAS_STATS``
    they are read from ``STATS[row] = (c1, c2)`` (:func:`ln_grad_stats_kernel`), so ``cols`` may be a chunk
    of the row; else ``cols`` is the whole row and they are summed here.  NORM likewise: with ``HAS_STATS``
    the row's mean and rstd are read from ``MEAN`` / ``RSTD`` (:func:`ln_fwd_stats_kernel`), else ``cols``
    is the whole row and they are computed here.
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
        if HAS_STATS:
            c1 = tl.load(STATS + tl.cast(row, tl.int64) * 2)
            c2 = tl.load(STATS + tl.cast(row, tl.int64) * 2 + 1)
        else:
            c1 = tl.sum(xhat * v, axis=0) / D
            c2 = tl.sum(v, axis=0) / D
        v = tl.where(mask, (v - (xhat * c1 + c2)) * rstd, 0.0)
        if HAS_RES:
            v += tl.load(RES + off, mask=mask, other=0.0).to(tl.float32)
    elif SRC != SRC_GRAD:
        if HAS_RES:
            v += tl.load(RES + off, mask=mask, other=0.0).to(tl.float32)
        if SRC == SRC_NORM:
            if HAS_STATS:
                v = tl.where(mask, (v - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
            else:
                mean, rstd, diff = _ln_stats(v, mask, D, eps)
                v = diff * rstd
            if HAS_WEIGHT:
                v = v * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _mixed_row(row, cols, mask, D, eps, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
               X, RES, W, BIAS, RIN, MEAN, RSTD, STATS,
               KIND: tl.constexpr, AXIS: tl.constexpr, SRC: tl.constexpr, HAS_RES: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns ``cols`` (``BLOCK_D`` of them) of row ``row`` of ``M @ source`` (``M`` applied within the row's
    group; prefix rows unmixed): the mix is column by column, so a chunk of the row is a chunk of the result."""
    v = _source_row(row, cols, mask, D, eps, X, RES, W, BIAS, RIN, MEAN, RSTD, STATS, SRC, HAS_RES, HAS_WEIGHT,
                    HAS_BIAS, HAS_STATS)
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
                u = _source_row(partner, cols, mask, D, eps, X, RES, W, BIAS, RIN, MEAN, RSTD, STATS,
                                SRC, HAS_RES, HAS_WEIGHT, HAS_BIAS, HAS_STATS)
                v = (1.0 - alpha) * v + alpha * u
            elif KIND == OPTIMAL:
                colsum = tl.load(COLSUM + tl.cast(g, tl.int64) * D + cols, mask=mask, other=0.0)
                v = (v + colsum) / (K + 1)
            else:
                acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                for j in range(0, K):
                    m = tl.load(MIX + i * K + j).to(tl.float32)
                    u = _source_row(base + j * stride, cols, mask, D, eps, X, RES, W, BIAS, RIN, MEAN, RSTD, STATS,
                                    SRC, HAS_RES, HAS_WEIGHT, HAS_BIAS, HAS_STATS)
                    acc += m * u
                v = acc
    return v


@triton.jit(do_not_specialize=["rows_per_split"])
def group_sum_kernel(PART, X, RES, W, BIAS, RIN, MEAN, RSTD, STATS, N, P, K, STEP, D, eps, rows_per_split,
                     AXIS: tl.constexpr, SRC: tl.constexpr, HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_STATS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``PART[g, s, c]`` = sum over rows ``s * rows_per_split ..`` (the next ``rows_per_split`` of the ``K``
    rows of group ``g``) of columns chunk ``c`` (``BLOCK_D`` wide) of the source (fp32, rows added in order);
    program ``(g, s, c)`` on grid ``(groups, splits, chunks)`` (one chunk unless ``BLOCK_D < D``, which
    needs ``HAS_STATS`` for an LN_GRAD source).

    Phase 1 of the column sum that makes ``optimal`` O(K D): ``M s = (s + sum_j s_j) / (K + 1)``.  The
    launcher adds the few partials of a group in a fixed order (phase 2): a two-level sum, deterministic,
    more accurate than one running sum over a long group, and with programs for every slice of a group
    when groups are few (``B`` groups on the tokens axis).  ``PART`` is ``(groups, splits, D)``.
    """
    g = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    if AXIS == AXIS_BATCH:
        base = P + g
        stride = N
    else:
        base = (g // STEP) * N + P + g % STEP
        stride = STEP
    j_start = split * rows_per_split
    j_end = tl.minimum(j_start + rows_per_split, K)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(j_start, j_end):
        acc += _source_row(base + j * stride, cols, mask, D, eps, X, RES, W, BIAS, RIN, MEAN, RSTD, STATS,
                           SRC, HAS_RES, HAS_WEIGHT, HAS_BIAS, HAS_STATS)
    out = (tl.cast(g, tl.int64) * tl.num_programs(1) + split) * D
    tl.store(PART + out + cols, acc, mask=mask)


@triton.jit(do_not_specialize=["shift_off"])
def ln_grad_stats_kernel(
    STATS, DY, RIN, W, MEAN, RSTD, MIX, COLSUM,
    N, P, K, STEP, D, alpha, shift_off,
    KIND: tl.constexpr, AXIS: tl.constexpr, HAS_WEIGHT: tl.constexpr, MIX_AFTER_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``STATS[row] = (c1, c2)``, the two row sums of the LayerNorm backward of row ``row`` (one program a
    row, ``BLOCK_D`` columns at a time): ``c1 = sum(x_hat * w * g) / D``, ``c2 = sum(w * g) / D`` with ``g``
    the gradient wrt the LayerNorm output: ``dy`` (default order) or ``dz = M^T dy`` (``MIX_AFTER_NORM``;
    ``MIX`` / ``COLSUM`` as for the backward kernel).  With them the backward of a row is column by column,
    so rows longer than one block are done in chunks (:func:`mix_add_layernorm_bwd_kernel`)."""
    row = tl.program_id(0)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    acc1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        off = tl.cast(row, tl.int64) * D + cols
        r = tl.load(RIN + off, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (r - mean) * rstd, 0.0)
        if MIX_AFTER_NORM:
            g = _mixed_row(row, cols, mask, D, 0.0, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                           DY, DY, W, W, RIN, MEAN, RSTD, STATS,
                           KIND, AXIS, SRC_GRAD, False, HAS_WEIGHT, False, False, BLOCK_D)
        else:
            g = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        acc1 += xhat * g
        acc2 += g
    tl.store(STATS + tl.cast(row, tl.int64) * 2, tl.sum(acc1, axis=0) / D)
    tl.store(STATS + tl.cast(row, tl.int64) * 2 + 1, tl.sum(acc2, axis=0) / D)


@triton.jit(do_not_specialize=["shift_off"])
def ln_fwd_stats_kernel(
    MEAN, RSTD, X, RES, W, BIAS, MIX, COLSUM,
    N, P, K, STEP, D, eps, alpha, shift_off,
    KIND: tl.constexpr, AXIS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MIX_AFTER_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``MEAN[row]``, ``RSTD[row]``: the statistics of the LayerNorm input of row ``row`` (``M (x + residual)``,
    or ``x + residual`` with ``MIX_AFTER_NORM``), one program a row, ``BLOCK_D`` columns at a time, for rows
    longer than one block (:func:`mix_add_layernorm_fwd_kernel` with ``HAS_STATS`` then reads them).

    Each chunk's mean and sum of squared deviations are exact two-pass values from registers; the chunks
    are merged with the pairwise update of Chan et al. (``M2 = M2_a + M2_b + delta^2 n_a n_b / n``), so the
    row is read once and the variance is as accurate as the one-block two-pass formula."""
    row = tl.program_id(0)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        if MIX_AFTER_NORM:
            r = _source_row(row, cols, mask, D, eps, X, RES, W, BIAS, X, MEAN, RSTD, MEAN,
                            SRC_SUM, HAS_RESIDUAL, False, False, False)
        else:
            r = _mixed_row(row, cols, mask, D, eps, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                           X, RES, W, BIAS, X, MEAN, RSTD, MEAN,
                           KIND, AXIS, SRC_SUM, HAS_RESIDUAL, False, False, False, BLOCK_D)
        n_chunk = tl.minimum(D - c0, BLOCK_D).to(tl.float32)
        chunk_mean = tl.sum(r, axis=0) / n_chunk
        diff = tl.where(mask, r - chunk_mean, 0.0)
        chunk_m2 = tl.sum(diff * diff, axis=0)
        total = count + n_chunk
        delta = chunk_mean - mean
        mean += delta * (n_chunk / total)
        m2 += chunk_m2 + delta * delta * (count * n_chunk / total)
        count = total
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, 1.0 / tl.sqrt(m2 / D + eps))


@triton.jit(do_not_specialize=["n_rows", "shift_off", "rows_per_program"])
def mix_add_layernorm_fwd_kernel(
    X, RES, W, BIAS,            # inputs: (R, D) x, residual; (D,) weight, bias
    Y, ROUT, MEAN, RSTD,        # outputs: (R, D) normed, residual_out; (R,) fp32 mean, rstd of the LN input
    MIX, COLSUM,                # (K, K) fp32 mixing matrix (dense); (groups, D) fp32 column sums (optimal)
    n_rows, N, P, K, STEP, D, eps, alpha, shift_off, rows_per_program,
    KIND: tl.constexpr, AXIS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, MIX_AFTER_NORM: tl.constexpr, HAS_STATS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Default order: ``r = M (x + residual)``, ``y = LN(r)``.  ``MIX_AFTER_NORM``: ``r = x + residual``,
    ``y = M LN(r)``.  Stores ``y``, ``r`` (residual_out) and the mean / rstd of the LN input ``r``.

    A row is one block (``BLOCK_D >= D``), or, with ``HAS_STATS``, ``BLOCK_D`` columns at a time with the
    statistics of every row already in ``MEAN`` / ``RSTD`` (:func:`ln_fwd_stats_kernel`): then no thread
    holds a whole long row."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    if HAS_STATS:
        for row in range(row_start, row_end):
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            for c0 in range(0, D, BLOCK_D):
                cols = c0 + tl.arange(0, BLOCK_D)
                mask = cols < D
                off = tl.cast(row, tl.int64) * D + cols
                if MIX_AFTER_NORM:
                    r = _source_row(row, cols, mask, D, eps, X, RES, W, BIAS, X, MEAN, RSTD, MEAN,
                                    SRC_SUM, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, False)
                    y = _mixed_row(row, cols, mask, D, eps, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                                   X, RES, W, BIAS, X, MEAN, RSTD, MEAN,
                                   KIND, AXIS, SRC_NORM, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, True, BLOCK_D)
                else:
                    r = _mixed_row(row, cols, mask, D, eps, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                                   X, RES, W, BIAS, X, MEAN, RSTD, MEAN,
                                   KIND, AXIS, SRC_SUM, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, False, BLOCK_D)
                    y = tl.where(mask, (r - mean) * rstd, 0.0)
                    if HAS_WEIGHT:
                        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    if HAS_BIAS:
                        y += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(ROUT + off, r.to(ROUT.dtype.element_ty), mask=mask)
                tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    else:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        for row in range(row_start, row_end):
            off = tl.cast(row, tl.int64) * D + cols
            if MIX_AFTER_NORM:
                r = _source_row(row, cols, mask, D, eps, X, RES, W, BIAS, X, MEAN, RSTD, MEAN,
                                SRC_SUM, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, False)
                mean, rstd, diff = _ln_stats(r, mask, D, eps)
                y = _mixed_row(row, cols, mask, D, eps, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                               X, RES, W, BIAS, X, MEAN, RSTD, MEAN,
                               KIND, AXIS, SRC_NORM, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, False, BLOCK_D)
            else:
                r = _mixed_row(row, cols, mask, D, eps, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                               X, RES, W, BIAS, X, MEAN, RSTD, MEAN,
                               KIND, AXIS, SRC_SUM, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, False, BLOCK_D)
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


@triton.jit(do_not_specialize=["n_rows", "shift_off", "rows_per_program"])
def mix_add_layernorm_bwd_kernel(
    DY, DRES, RIN, W, MEAN, RSTD,   # (R, D) d_normed, d_residual_out, saved LN input (= residual_out)
    DX,                             # output (R, D): gradient wrt x (and residual)
    DW_PART, DB_PART,               # outputs (programs, D) fp32 per-program partials of dweight, dbias
    MIX, COLSUM, STATS,             # (K, K) fp32 M^T (dense); (groups, D) fp32 column sums (optimal); (R, 2)
    n_rows, N, P, K, STEP, D, alpha, shift_off, rows_per_program,
    KIND: tl.constexpr, AXIS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    MIX_AFTER_NORM: tl.constexpr, HAS_STATS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Default order: ``g = LN-backward(dy) + d_residual_out`` (the gradient wrt ``r = M s``), and
    ``ds = M^T g``.  ``MIX_AFTER_NORM``: ``dz = M^T dy``, ``ds = LN-backward(dz) + d_residual_out``.
    ``dweight``/``dbias`` partials are the sums over this program's rows of ``dz * xhat`` / ``dz``
    (``dz = dy`` in the default order).

    The row is ``BLOCK_D`` columns at a time, chunks outside, rows inside (each chunk's ``dweight`` /
    ``dbias`` accumulators stay in registers): one chunk when ``BLOCK_D >= D``, with the LayerNorm
    backward's row sums taken here; several with ``HAS_STATS``, the sums then read from ``STATS``
    (:func:`ln_grad_stats_kernel`), so no thread holds a whole long row."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        for row in range(row_start, row_end):
            off = tl.cast(row, tl.int64) * D + cols
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            r = tl.load(RIN + off, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (r - mean) * rstd, 0.0)
            if MIX_AFTER_NORM:
                dz = _mixed_row(row, cols, mask, D, 0.0, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                                DY, DRES, W, W, RIN, MEAN, RSTD, STATS,
                                KIND, AXIS, SRC_GRAD, False, HAS_WEIGHT, False, False, BLOCK_D)
                if HAS_WEIGHT:
                    wdz = dz * w
                else:
                    wdz = dz
                if HAS_STATS:
                    c1 = tl.load(STATS + tl.cast(row, tl.int64) * 2)
                    c2 = tl.load(STATS + tl.cast(row, tl.int64) * 2 + 1)
                else:
                    c1 = tl.sum(xhat * wdz, axis=0) / D
                    c2 = tl.sum(wdz, axis=0) / D
                ds = (wdz - (xhat * c1 + c2)) * rstd
                if HAS_DRES:
                    ds += tl.load(DRES + off, mask=mask, other=0.0).to(tl.float32)
            else:
                dz = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
                ds = _mixed_row(row, cols, mask, D, 0.0, N, P, K, STEP, alpha, shift_off, MIX, COLSUM,
                                DY, DRES, W, W, RIN, MEAN, RSTD, STATS,
                                KIND, AXIS, SRC_LN_GRAD, HAS_DRES, HAS_WEIGHT, False, HAS_STATS, BLOCK_D)
            dw_acc += dz * xhat
            db_acc += dz
            tl.store(DX + off, ds.to(DX.dtype.element_ty), mask=mask)
        part = tl.cast(pid, tl.int64) * D + cols
        tl.store(DW_PART + part, dw_acc, mask=mask)
        tl.store(DB_PART + part, db_acc, mask=mask)
