"""Triton kernels of noisy attention: flash attention with the ``(I + Q)`` mix of the query rows.

Tensors are ``(B, H, N, Dh)`` with any strides whose last one is 1; kernels take the batch, head
and token strides of each tensor (``s*b``, ``s*h``, ``s*n``), so the strided ``q``/``k``/``v`` views
of a fused ``qkv`` projection are read in place.  The head dim lives in one ``BLOCK_D`` block
(``next_power_of_2(Dh)``, at least 16), masked, so ``Dh = 80`` runs as a 128-wide block whose
padding is zero in every product.  Softmax runs in base 2 (``exp2``, scores pre-multiplied by
``scale * log2(e)``); the saved logsumexp ``LSE`` is natural-log, one fp32 per query row.

Mixing geometry (``M`` acts on the query tokens of the attention output; ``P`` prefix tokens are
never mixed).  Patch token ``p = n - P`` of row ``(b, h, n)`` is position ``i`` of a group of ``K``
rows; member ``j`` of the group is the row written on the right:

======== ========= =================================== ================= ==============================
axis     i         group id ``g``                      K                 member ``j``
======== ========= =================================== ================= ==============================
tokens   ``p``     ``b * H + h``                       ``N - P``         ``(b, h, P + j)``
rows     ``p//gw`` ``(b * H + h) * gw + p % gw``       ``gh``            ``(b, h, P + j * gw + p % gw)``
batch    ``b``     ``h * (N - P) + p``                 ``B``             ``(j, h, n)``
======== ========= =================================== ================= ==============================

(tokens is rows with ``gw = 1``.)  What is fused where:

- :func:`attn_fwd_kernel`: online-softmax attention per ``BLOCK_M`` query tile; stores ``O`` and
  ``LSE``.  For ``optimal`` on ``tokens``/``rows`` its epilogue also stores the tile's fp32 column
  sums of ``O`` per group (phase 1 of a deterministic two-phase reduction; the launcher adds the
  few tile partials in a fixed order).
- :func:`group_sum_kernel`: the fp32 column sum of each group read from a ``(B, H, N, Dh)`` tensor,
  members added in order (``optimal`` on ``batch`` in forward; ``dY`` for every axis in backward).
- :func:`mix_kernel`: one row-wise pass ``Y = M O`` (forward) or ``dO = M^T dY`` (backward, where
  it also computes ``delta = rowsum(dO * O)``, the flash-attention backward's preprocessing).
  ``shift`` reads one partner row (a halo read across tiles); ``optimal`` adds its group's column
  sum; ``dense`` multiplies by its ``K x K`` matrix (a tiled product on ``tokens``, a loop over
  the members otherwise).  Never an ``N x N`` score matrix.
- :func:`attn_bwd_dkdv_kernel` (one program per key tile, looping over query tiles) and
  :func:`attn_bwd_dq_kernel` (one program per query tile, looping over key tiles) recompute the
  probabilities from ``LSE``: each output element is written by exactly one program, no atomics,
  so backward is deterministic.

Accumulation is fp32 everywhere; ``O``, ``Y``, ``dO``, ``dq``, ``dk``, ``dv`` are stored in their
tensor's dtype.  Products of fp16 / bf16 tiles use those types with fp32 accumulators (as flash
attention does); fp32 products use ``DOT_PRECISION`` (``ieee`` for full fp32 accuracy).
"""

import triton
import triton.language as tl

# mixing kinds and axes (the ops pass the codes as ints)
from ._codes import AXIS_BATCH, AXIS_TOKENS, IDENTITY, OPTIMAL, SHIFT

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _head(T, b, h, sb, sh):
    """Pointer to token 0 of head ``(b, h)`` of a ``(B, H, N, Dh)`` tensor with batch / head strides ``sb``, ``sh``."""
    return T + tl.cast(b, tl.int64) * sb + tl.cast(h, tl.int64) * sh


@triton.jit
def _tile(head, rows, offs_d, sn):
    """Pointers of the ``(rows, offs_d)`` tile of a head (from :func:`_head`) with token stride ``sn``."""
    return head + rows[:, None].to(tl.int64) * sn + offs_d[None, :]


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, PART,  # noqa: E741 (O: the attention output, as in the papers)
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, N, P, GW, DH, qk_scale, n_tiles,
    PARTIAL: tl.constexpr, GW_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``O = softmax(q k^T * scale) v`` for one ``BLOCK_M`` query tile of one ``(b, h)``; ``LSE`` its
    natural logsumexp.  ``qk_scale = scale * log2(e)``.

    ``PARTIAL`` (``optimal`` only): 0 none; 1 (tokens) ``PART[(b*H + h), tile, 0, :]`` = sum of the
    tile's patch rows of ``O``; 2 (rows) ``PART[(b*H + h), tile, c, :]`` = sum of the tile's patch rows
    in grid column ``c`` (a one-hot ``GW_PAD x BLOCK_M`` product).  fp32, from the unrounded ``O``.
    """
    pid_bh = tl.program_id(0)  # batch x heads on axis 0 (up to 2^31 - 1; axes 1 and 2 stop at 65535)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < DH
    k_base = _head(K, b, h, skb, skh)
    v_base = _head(V, b, h, svb, svh)
    q = tl.load(_tile(_head(Q, b, h, sqb, sqh), offs_m, offs_d, sqn), mask=mask_m[:, None] & mask_d[None, :],
                other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(_tile(k_base, cols, offs_d, skn), mask=kv_mask, other=0.0)
        v = tl.load(_tile(v_base, cols, offs_d, svn), mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        corr = tl.exp2(m_i - m_new)
        l_i = l_i * corr + tl.sum(p, axis=1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(_tile(_head(O, b, h, sob, soh), offs_m, offs_d, son), o.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + tl.cast(pid_bh, tl.int64) * N + offs_m, lse, mask=mask_m)

    if PARTIAL != 0:
        patch = mask_m & (offs_m >= P)
        part_base = PART + (tl.cast(pid_bh, tl.int64) * n_tiles + pid_m) * GW * DH
        if PARTIAL == 1:
            part = tl.sum(tl.where(patch[:, None], o, 0.0), axis=0)
            tl.store(part_base + offs_d, part, mask=mask_d)
        else:
            col = (offs_m - P) % GW
            groups = tl.arange(0, GW_PAD)
            onehot = tl.where((col[None, :] == groups[:, None]) & patch[None, :], 1.0, 0.0)
            part = tl.dot(onehot, o, input_precision="ieee")  # (GW_PAD, BLOCK_D): per-column sums
            tl.store(part_base + groups[:, None] * DH + offs_d[None, :], part,
                     mask=(groups[:, None] < GW) & mask_d[None, :])


@triton.jit
def _member_offsets(b, h, n, j, sb, sh, sn, P, GW, AXIS: tl.constexpr):
    """Element offsets of member ``j`` of the groups of rows ``(b, h, n)`` (``n`` a patch token)."""
    if AXIS == AXIS_BATCH:
        off = j * sb + h * sh + n * sn
    else:
        c = (n - P) % GW
        off = b * sb + h * sh + (P + j * GW + c) * sn
    return off


@triton.jit
def group_sum_kernel(
    OUT, X, sxb, sxh, sxn,
    H, N, P, K, GW, DH,
    AXIS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``OUT[g, :] = sum over the K members of group g of X`` (fp32, members added in order, BLOCK_K
    at a time, the same order on every run).  One program per group."""
    g = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < DH
    n_patch = N - P
    if AXIS == AXIS_BATCH:
        h = g // n_patch
        base = tl.cast(h, tl.int64) * sxh + tl.cast(P + g % n_patch, tl.int64) * sxn
        stride = tl.cast(sxb, tl.int64)
    else:
        s = g // GW
        base = (tl.cast(s // H, tl.int64) * sxb + tl.cast(s % H, tl.int64) * sxh
                + tl.cast(P + g % GW, tl.int64) * sxn)
        stride = tl.cast(GW, tl.int64) * sxn
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        j = start + offs_k
        x = tl.load(X + base + j[:, None].to(tl.int64) * stride + offs_d[None, :],
                    mask=(j[:, None] < K) & mask_d[None, :], other=0.0)
        acc += x.to(tl.float32)
    tl.store(OUT + tl.cast(g, tl.int64) * DH + offs_d, tl.sum(acc, axis=0), mask=mask_d)


@triton.jit
def mix_kernel(
    SRC, OUT, O, DELTA, MIX, COLSUM,  # noqa: E741 (O: the attention output)
    ssb, ssh, ssn, sob, soh, son, s_ob, s_oh, s_on,
    H, N, P, K, GW, DH, alpha, shift_off,
    KIND: tl.constexpr, AXIS: tl.constexpr, STORE_OUT: tl.constexpr, WITH_DELTA: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``(b, h, n)`` for ``BLOCK_R`` tokens of one ``(b, h)``: ``OUT = M SRC`` along ``AXIS``
    (prefix rows copied).  ``MIX`` is the ``K x K`` matrix (``dense``; pass ``M^T`` for backward),
    ``COLSUM[g]`` the group sums of ``SRC`` (``optimal``), ``shift_off`` the partner position
    ``(i + shift_off) mod K`` (a shift of direction ``s``: ``(K - s) mod K`` forward, ``(K + s) mod K``
    backward).  ``WITH_DELTA``: also store
    ``DELTA[(b*H + h)*N + n] = sum_d OUT * O`` (fp32; ``OUT`` as rounded to its dtype).
    ``STORE_OUT=False`` with ``KIND=IDENTITY`` computes ``delta`` only (``dO = dY``)."""
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = n < N
    mask_d = offs_d < DH
    mask = mask_r[:, None] & mask_d[None, :]
    x = tl.load(_tile(_head(SRC, b, h, ssb, ssh), n, offs_d, ssn), mask=mask, other=0.0).to(tl.float32)
    y = x
    if KIND != IDENTITY:
        p = n - P
        mixed = mask_r & (p >= 0)
        pc = tl.where(mixed, p, 0)
        nc = pc + P
        mmask = mixed[:, None] & mask_d[None, :]
        if AXIS == AXIS_BATCH:
            i = tl.zeros([BLOCK_R], dtype=tl.int32) + b
        else:
            i = pc // GW
        b64 = tl.cast(b, tl.int64)
        h64 = tl.cast(h, tl.int64)
        if KIND == SHIFT:
            partner = (i + shift_off) % K
            off = _member_offsets(b64, h64, nc.to(tl.int64), partner.to(tl.int64), ssb, ssh, ssn, P, GW, AXIS)
            u = tl.load(SRC + off[:, None] + offs_d[None, :], mask=mmask, other=0.0).to(tl.float32)
            y = tl.where(mixed[:, None], (1.0 - alpha) * x + alpha * u, x)
        elif KIND == OPTIMAL:
            if AXIS == AXIS_BATCH:
                g = h * (N - P) + pc
            else:
                g = pid_bh * GW + pc % GW
            cs = tl.load(COLSUM + g[:, None].to(tl.int64) * DH + offs_d[None, :], mask=mmask, other=0.0)
            y = tl.where(mixed[:, None], (x + cs) / (K + 1), x)
        elif AXIS == AXIS_TOKENS:
            # The members of every row of this tile are the same K tokens: a (BLOCK_R x K) @ (K x Dh)
            # product, BLOCK_J members at a time.
            acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
            offs_j = tl.arange(0, BLOCK_J)
            src_base = tl.cast(b, tl.int64) * ssb + tl.cast(h, tl.int64) * ssh
            for start_j in range(0, K, BLOCK_J):
                j = start_j + offs_j
                mask_j = j < K
                m = tl.load(MIX + i[:, None] * K + j[None, :], mask=mixed[:, None] & mask_j[None, :], other=0.0)
                u = tl.load(SRC + src_base + (P + j[:, None]).to(tl.int64) * ssn + offs_d[None, :],
                            mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
                acc += tl.dot(m, u, input_precision="ieee")
            y = tl.where(mixed[:, None], acc, x)
        else:
            acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
            for j in range(0, K):
                m = tl.load(MIX + i * K + j, mask=mixed, other=0.0).to(tl.float32)
                off = _member_offsets(b64, h64, nc.to(tl.int64), tl.cast(j, tl.int64), ssb, ssh, ssn, P, GW, AXIS)
                u = tl.load(SRC + off[:, None] + offs_d[None, :], mask=mmask, other=0.0).to(tl.float32)
                acc += m[:, None] * u
            y = tl.where(mixed[:, None], acc, x)
    if STORE_OUT:
        y_st = y.to(OUT.dtype.element_ty)
        tl.store(_tile(_head(OUT, b, h, sob, soh), n, offs_d, son), y_st, mask=mask)
        y = y_st.to(tl.float32)
    if WITH_DELTA:
        o = tl.load(_tile(_head(O, b, h, s_ob, s_oh), n, offs_d, s_on), mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + tl.cast(pid_bh, tl.int64) * N + n, tl.sum(y * o, axis=1), mask=mask_r)


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
    H, N, DH, scale, qk_scale,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dK``, ``dV`` of one ``BLOCK_N`` key tile of one ``(b, h)``, looping over every query tile
    (``P^T`` recomputed from ``LSE``): ``dV = P^T dO``, ``dK = scale * dS^T q`` with
    ``dS = P * (dO v^T - delta)``.  ``DK``/``DV`` share the strides ``sg*``."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < DH
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(_tile(_head(K, b, h, skb, skh), offs_n, offs_d, skn), mask=kv_mask, other=0.0)
    v = tl.load(_tile(_head(V, b, h, svb, svh), offs_n, offs_d, svn), mask=kv_mask, other=0.0)
    q_base = _head(Q, b, h, sqb, sqh)
    do_base = _head(DO, b, h, sdb, sdh)
    row_base = tl.cast(pid_bh, tl.int64) * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(_tile(q_base, rows, offs_d, sqn), mask=q_mask, other=0.0)
        do = tl.load(_tile(do_base, rows, offs_d, sdn), mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + row_base + rows, mask=mask_m, other=0.0) * LOG2E
        delta = tl.load(DELTA + row_base + rows, mask=mask_m, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale     # (BLOCK_N, BLOCK_M)
        p_t = tl.where(mask_m[None, :], tl.exp2(qk_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    dk = dk * scale
    tl.store(_tile(_head(DK, b, h, sgb, sgh), offs_n, offs_d, sgn), dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile(_head(DV, b, h, sgb, sgh), offs_n, offs_d, sgn), dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
    H, N, DH, scale, qk_scale,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dQ = scale * dS k`` of one ``BLOCK_M`` query tile of one ``(b, h)``, looping over every key
    tile (``P`` recomputed from ``LSE``).  ``DQ`` has the strides ``sg*``."""
    pid_bh = tl.program_id(0)  # batch x heads on axis 0 (up to 2^31 - 1; axes 1 and 2 stop at 65535)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < DH
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(_tile(_head(Q, b, h, sqb, sqh), offs_m, offs_d, sqn), mask=q_mask, other=0.0)
    do = tl.load(_tile(_head(DO, b, h, sdb, sdh), offs_m, offs_d, sdn), mask=q_mask, other=0.0)
    row_base = tl.cast(pid_bh, tl.int64) * N
    lse2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    k_base = _head(K, b, h, skb, skh)
    v_base = _head(V, b, h, svb, svh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(_tile(k_base, cols, offs_d, skn), mask=kv_mask, other=0.0)
        v = tl.load(_tile(v_base, cols, offs_d, svn), mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.where(mask_n[None, :], tl.exp2(qk - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq = dq * scale
    tl.store(_tile(_head(DQ, b, h, sgb, sgh), offs_m, offs_d, sgn), dq.to(DQ.dtype.element_ty), mask=q_mask)
