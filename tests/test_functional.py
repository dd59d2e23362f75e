"""Tests of noisynn_kernels.functional: linear transform noise, Gaussian and salt-and-pepper noise.

The expected value of linear transform noise is an explicit dense ``(I + Q)`` product in float64,
written here with einsum from :func:`quality.mixing_matrix`; reference.py is not used as an oracle.
"""

import math
import time

import pytest
import torch
from _oracle import dense_q
from _oracle import gen as _gen

from noisynn_kernels import AXES, quality
from noisynn_kernels import functional as F
from noisynn_kernels._ext import backend_status
from noisynn_kernels.errors import ConfigError, NoisyNNError, QualityMatrixError, ShapeError

KINDS = quality.LINEAR_KINDS
ALPHA = 0.3


def _geometry(shape, axis, prefix, grid):
    """(k, gh, gw) for a shape: k is the number of mixed rows."""
    if len(shape) == 3:
        B, N, D = shape
        n = N - prefix
        if axis == "batch":
            return B, None, None
        if axis == "tokens":
            return n, None, None
        gh, gw = grid if grid is not None else (math.isqrt(n), math.isqrt(n))
        return gh, gh, gw
    B, C, H, W = shape
    return {"batch": B, "tokens": H * W, "rows": H}[axis], None, None


def expected_linear(x, kind, axis, *, alpha=ALPHA, Q=None, prefix=0, grid=None, dtype=torch.float64):
    """(I + Q) X along ``axis`` as an explicit dense product, computed in ``dtype``."""
    xx = x.detach().to(dtype)
    k, gh, gw = _geometry(tuple(x.shape), axis, prefix, grid)
    M = quality.mixing_matrix(kind, k, alpha, matrix=Q).to(dtype)
    if x.dim() == 3:
        head, body = xx[:, :prefix], xx[:, prefix:]
        B, n, D = body.shape
        if axis == "batch":
            y = torch.einsum("bc,cnd->bnd", M, body)
        elif axis == "tokens":
            y = torch.einsum("ij,bjd->bid", M, body)
        else:
            y = torch.einsum("rs,bswd->brwd", M, body.reshape(B, gh, gw, D)).reshape(B, n, D)
        return torch.cat([head, y], dim=1)
    B, C, H, W = xx.shape
    if axis == "batch":
        return torch.einsum("bc,cxhw->bxhw", M, xx)
    if axis == "tokens":
        return torch.einsum("ij,bcj->bci", M, xx.reshape(B, C, H * W)).reshape(B, C, H, W)
    return torch.einsum("rs,bcsw->bcrw", M, xx)


def call(x, kind, axis, *, prefix=0, grid=None, alpha=ALPHA, Q=None, **kw):
    return F.linear_transform_noise(x, kind, axis=axis, alpha=alpha, matrix=Q, prefix_tokens=prefix, grid=grid, **kw)


def q_for(kind, shape, axis, prefix=0, grid=None, seed=0):
    if kind != "dense":
        return None
    return dense_q(_geometry(tuple(shape), axis, prefix, grid)[0], seed)


# (shape, prefix_tokens, grid): token inputs with 0, 1 and 5 prefix tokens, odd D, explicit non-square grids
TOKEN_CASES = [
    ((2, 9, 7), 0, None),
    ((3, 10, 7), 1, None),
    ((2, 21, 5), 5, None),        # 16 patches, inferred 4 x 4
    ((3, 15, 7), 0, (3, 5)),
    ((2, 16, 3), 1, (5, 3)),
    ((4, 11, 7), 5, (2, 3)),
    ((1, 5, 7), 1, (1, 4)),
    ((5, 7, 1), 0, (7, 1)),
]
FMAP_SHAPES = [(2, 3, 5, 4), (3, 2, 4, 4), (1, 3, 3, 5), (4, 1, 6, 1)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("shape,prefix,grid", TOKEN_CASES)
def test_tokens_match_dense_product(kind, axis, shape, prefix, grid):
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(1))
    Q = q_for(kind, shape, axis, prefix, grid)
    out = call(x, kind, axis, prefix=prefix, grid=grid, Q=Q)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    exp = expected_linear(x, kind, axis, Q=Q, prefix=prefix, grid=grid)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    # prefix tokens pass through bit for bit
    assert torch.equal(out[:, :prefix], x[:, :prefix])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("shape", FMAP_SHAPES)
def test_feature_maps_match_dense_product(kind, axis, shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(2))
    Q = q_for(kind, shape, axis)
    out = call(x, kind, axis, Q=Q)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(out, expected_linear(x, kind, axis, Q=Q), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("alpha", (0.0, 0.1, 0.5, 0.45))
def test_shift_alphas(axis, alpha):
    shape, prefix, grid = (3, 16, 5), 1, (3, 5)
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(3))
    out = call(x, "shift", axis, prefix=prefix, grid=grid, alpha=alpha, check=(alpha != 0.5))
    torch.testing.assert_close(out, expected_linear(x, "shift", axis, alpha=alpha, prefix=prefix, grid=grid),
                               rtol=1e-12, atol=1e-12)


def test_shift_row_form_explicit():
    """y_i = (1 - a) x_i + a x_{(i-1) mod k} along tokens, written with indices."""
    x = torch.randn(2, 1 + 6, 3, dtype=torch.float64, generator=_gen(4))
    out = call(x, "shift", "tokens", prefix=1, alpha=0.25)
    body = x[:, 1:]
    for i in range(6):
        torch.testing.assert_close(out[:, 1 + i], 0.75 * body[:, i] + 0.25 * body[:, (i - 1) % 6],
                                   rtol=1e-14, atol=1e-14)


def test_optimal_row_form_explicit():
    """y_i = (x_i + sum_j x_j) / (k + 1) along the batch."""
    x = torch.randn(4, 3, 2, dtype=torch.float64, generator=_gen(5))
    out = call(x, "optimal", "batch")
    s = x.sum(dim=0)
    for i in range(4):
        torch.testing.assert_close(out[i], (x[i] + s) / 5, rtol=1e-14, atol=1e-14)


def test_identity_is_unchanged():
    x = torch.randn(2, 5, 3, generator=_gen(6))
    for axis in AXES:
        out = call(x, "identity", axis, prefix=1, grid=(2, 2))
        assert torch.equal(out, x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,prefix", [((1, 10, 7), 1), ((1, 3, 4, 5), 0)])
def test_batch_axis_with_one_sample_is_identity(kind, shape, prefix):
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(7))
    Q = torch.zeros(1, 1, dtype=torch.float64) + 0.25 if kind == "dense" else None  # M = [[1.25]] for dense
    out = call(x, kind, "batch", prefix=prefix, Q=Q)
    if kind == "dense":
        torch.testing.assert_close(out[:, prefix:], 1.25 * x[:, prefix:], rtol=1e-14, atol=0)
    else:
        torch.testing.assert_close(out, x, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# Sample locality
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", ("tokens", "rows"))
@pytest.mark.parametrize("shape,prefix,grid", [((4, 13, 5), 1, (3, 4)), ((3, 2, 4, 6), 0, None)])
def test_sample_local_axes_ignore_other_samples(kind, axis, shape, prefix, grid):
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(8))
    Q = q_for(kind, shape, axis, prefix, grid)
    out = call(x, kind, axis, prefix=prefix, grid=grid, Q=Q)
    x2 = torch.randn(*shape, dtype=torch.float64, generator=_gen(9)) * 10
    for i in range(shape[0]):
        y = x2.clone()
        y[i] = x[i]
        out2 = call(y, kind, axis, prefix=prefix, grid=grid, Q=Q)
        torch.testing.assert_close(out2[i], out[i], rtol=1e-13, atol=1e-13)
        alone = call(x[i:i + 1], kind, axis, prefix=prefix, grid=grid, Q=Q)
        torch.testing.assert_close(alone[0], out[i], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
def test_batch_axis_does_depend_on_other_samples(kind):
    """Sanity check of the locality test above: batch mixing does see the rest of the batch."""
    shape = (3, 5, 4)
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(10))
    Q = q_for(kind, shape, "batch")
    out = call(x, kind, "batch", Q=Q)
    y = x.clone()
    y[1:] += 5.0
    out2 = call(y, kind, "batch", Q=Q)
    assert not torch.allclose(out2[0], out[0])


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------
def _non_contiguous_tokens(shape, dtype=torch.float64):
    B, N, D = shape
    base = torch.randn(B, D, N, dtype=dtype, generator=_gen(11))
    views = {
        "transposed": base.transpose(1, 2),
        "sliced": torch.randn(B, N, 2 * D, dtype=dtype, generator=_gen(12))[:, :, ::2],
        "batch_strided": torch.randn(2 * B, N, D, dtype=dtype, generator=_gen(13))[::2],
        "offset": torch.randn(B, N + 3, D, dtype=dtype, generator=_gen(14))[:, 3:],
    }
    for name, v in views.items():
        assert v.shape == shape
        if name != "offset":
            assert not v.is_contiguous(), name
    return views


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
def test_non_contiguous_tokens(kind, axis):
    shape, prefix, grid = (3, 11, 4), 1, (2, 5)
    Q = q_for(kind, shape, axis, prefix, grid)
    for name, v in _non_contiguous_tokens(shape).items():
        out = call(v, kind, axis, prefix=prefix, grid=grid, Q=Q)
        ref = call(v.contiguous(), kind, axis, prefix=prefix, grid=grid, Q=Q)
        assert out.shape == v.shape
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13, msg=name)
        torch.testing.assert_close(out, expected_linear(v, kind, axis, Q=Q, prefix=prefix, grid=grid),
                                   rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
def test_non_contiguous_and_channels_last_feature_maps(kind, axis):
    shape = (2, 3, 4, 5)
    Q = q_for(kind, shape, axis)
    views = {
        "permuted": torch.randn(2, 4, 5, 3, dtype=torch.float64, generator=_gen(15)).permute(0, 3, 1, 2),
        "sliced": torch.randn(2, 3, 4, 10, dtype=torch.float64, generator=_gen(16))[..., 1::2],
        "hw_transposed": torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=_gen(17)).transpose(2, 3),
        "channels_last": torch.randn(*shape, dtype=torch.float64, generator=_gen(18)).contiguous(
            memory_format=torch.channels_last),
    }
    for name, v in views.items():
        assert v.shape == shape and not v.is_contiguous(), name
        out = call(v, kind, axis, Q=Q)
        assert out.shape == shape and out.dtype == v.dtype
        torch.testing.assert_close(out, call(v.contiguous(), kind, axis, Q=Q), rtol=1e-13, atol=1e-13, msg=name)
        torch.testing.assert_close(out, expected_linear(v, kind, axis, Q=Q), rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
def test_channels_last_is_preserved(kind, axis):
    shape = (2, 3, 4, 4)
    x = torch.randn(*shape, generator=_gen(19)).contiguous(memory_format=torch.channels_last)
    out = call(x, kind, axis, Q=q_for(kind, shape, axis))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_does_not_modify_input():
    x = torch.randn(3, 10, 4, generator=_gen(20))
    x0 = x.clone()
    for kind in KINDS:
        for axis in AXES:
            call(x, kind, axis, prefix=1, grid=(3, 3), Q=q_for(kind, x.shape, axis, 1, (3, 3)))
            assert torch.equal(x, x0), (kind, axis)


# ------------------------------------------------------------------------------------------------
# Reduced precision
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("case", ("tokens", "fmap"))
def test_low_precision_keeps_dtype_and_accuracy(dtype, kind, axis, case):
    if case == "tokens":
        shape, prefix, grid = (6, 1 + 48, 24), 1, (6, 8)
    else:
        shape, prefix, grid = (6, 4, 7, 9), 0, None
    x = torch.randn(*shape, generator=_gen(21)).to(dtype)
    Q = q_for(kind, shape, axis, prefix, grid)
    out = call(x, kind, axis, prefix=prefix, grid=grid, Q=Q)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    exact = expected_linear(x, kind, axis, Q=Q, prefix=prefix, grid=grid, dtype=torch.float64)
    same_dtype = expected_linear(x, kind, axis, Q=Q, prefix=prefix, grid=grid, dtype=dtype)
    err = (out.double() - exact).abs().max().item()
    torch_err = (same_dtype.double() - exact).abs().max().item()
    half_ulp = 0.5 * torch.finfo(dtype).eps * exact.abs().max().item()  # rounding of the output itself
    assert err <= 2 * torch_err + half_ulp, (err, torch_err, half_ulp)
    if x.dim() == 3:
        assert torch.equal(out[:, :prefix], x[:, :prefix])


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------
GRAD_CASES = [((3, 1 + 6, 2), 1, (2, 3)), ((2, 2 + 4, 3), 2, None), ((3, 2, 3, 2), 0, None)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("shape,prefix,grid", GRAD_CASES)
def test_gradcheck(kind, axis, shape, prefix, grid):
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(22), requires_grad=True)
    Q = q_for(kind, shape, axis, prefix, grid)
    assert torch.autograd.gradcheck(lambda t: call(t, kind, axis, prefix=prefix, grid=grid, Q=Q), (x,))


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("axis", AXES)
def test_gradient_is_m_transpose(kind, axis):
    """Backward of y = M x along tokens is g -> M^T g; prefix gradient passes through."""
    shape, prefix, grid = (2, 1 + 6, 3), 1, (2, 3)
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(23), requires_grad=True)
    Q = q_for(kind, shape, axis, prefix, grid)
    g = torch.randn(*shape, dtype=torch.float64, generator=_gen(24))
    call(x, kind, axis, prefix=prefix, grid=grid, Q=Q).backward(g)
    # the adjoint of a dense product with M is the same product with M^T (= dense Q^T + I - I ...)
    k = _geometry(shape, axis, prefix, grid)[0]
    Mt_minus_I = (quality.mixing_matrix(kind, k, ALPHA, matrix=Q).T - torch.eye(k, dtype=torch.float64))
    exp = expected_linear(g, "dense", axis, Q=Mt_minus_I, prefix=prefix, grid=grid)
    torch.testing.assert_close(x.grad, exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("shape,prefix,grid", [((3, 1 + 6, 2), 1, (2, 3)), ((3, 2, 3, 2), 0, None)])
def test_straight_through(kind, axis, shape, prefix, grid):
    Q = q_for(kind, shape, axis, prefix, grid)
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(25), requires_grad=True)
    y = call(x, kind, axis, prefix=prefix, grid=grid, Q=Q, straight_through=True)
    torch.testing.assert_close(y.detach(), expected_linear(x, kind, axis, Q=Q, prefix=prefix, grid=grid),
                               rtol=1e-12, atol=1e-12)
    g = torch.randn(*shape, dtype=torch.float64, generator=_gen(26))
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_straight_through_float32_grad_is_exact_identity():
    x = torch.randn(4, 10, 8, generator=_gen(27), requires_grad=True)
    y = call(x, "optimal", "tokens", prefix=1, straight_through=True)
    g = torch.randn(4, 10, 8, generator=_gen(28))
    y.backward(g)
    assert torch.equal(x.grad, g)
    assert not torch.allclose(y.detach(), x.detach())  # forward value is M x, not x


# ------------------------------------------------------------------------------------------------
# Cost: no k x k matrix for the structured kinds
# ------------------------------------------------------------------------------------------------
def _forbid_dense_products(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a dense k x k product / matrix was built")

    for name in ("matmul", "einsum", "mm", "bmm", "eye", "tensordot", "baddbmm", "addmm"):
        monkeypatch.setattr(torch, name, boom)
    monkeypatch.setattr(torch.Tensor, "__matmul__", boom)
    monkeypatch.setattr(torch.Tensor, "matmul", boom)
    monkeypatch.setattr(torch.Tensor, "mm", boom)
    monkeypatch.setattr(torch.Tensor, "bmm", boom)
    monkeypatch.setattr(torch.nn.functional, "linear", boom)
    for name in ("mixing_matrix", "shift", "optimal", "validate"):
        monkeypatch.setattr(quality, name, boom)


@pytest.mark.parametrize("kind", ("identity", "shift", "optimal"))
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("shape,prefix,grid", [((3, 1 + 12, 4), 1, (3, 4)), ((2, 3, 4, 5), 0, None)])
def test_structured_kinds_build_no_matrix(monkeypatch, kind, axis, shape, prefix, grid):
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(29))
    exp = expected_linear(x, kind, axis, prefix=prefix, grid=grid)  # computed before patching
    with monkeypatch.context() as m:
        _forbid_dense_products(m)
        out = call(x, kind, axis, prefix=prefix, grid=grid)
        xs = x.clone().requires_grad_(True)
        call(xs, kind, axis, prefix=prefix, grid=grid).sum().backward()
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)


def test_forbid_patch_is_effective_for_dense():
    """The patch above does intercept the dense path, so its passing for shift/optimal means something."""
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as m:
        _forbid_dense_products(m)
        with pytest.raises(AssertionError, match="dense"):
            call(x, "dense", "tokens", Q=dense_q(5))


@pytest.mark.parametrize("kind", ("shift", "optimal"))
@pytest.mark.parametrize("check", (True, False))
def test_large_k_is_linear_time(kind, check):
    """k = 20000 mixed rows: valid for both kinds (shift with alpha = 0.3 is invertible for every k,
    det = 0.7^k (1 - (-3/7)^k) != 0, and dominant), so check=True must pass too."""
    k, D = 20000, 4
    x = torch.randn(2, 1 + k, D, dtype=torch.float64, generator=_gen(30))
    t0 = time.perf_counter()
    out = call(x, kind, "tokens", prefix=1, check=check)
    out_b = call(x[:, 1:].reshape(k, 2, D).contiguous(), kind, "batch", check=check)  # k = 20000 samples
    elapsed = time.perf_counter() - t0
    # a dense 20000 x 20000 fp64 matrix alone is 3.2 GB; O(k d) work on 160k elements is milliseconds
    assert elapsed < 1.0, elapsed
    body = x[:, 1:]
    idx = torch.arange(k)
    if kind == "shift":
        exp = (1 - ALPHA) * body + ALPHA * body[:, (idx - 1) % k]
    else:
        exp = (body + body.sum(dim=1, keepdim=True)) / (k + 1)
    torch.testing.assert_close(out[:, 1:], exp, rtol=1e-10, atol=1e-12)
    assert torch.equal(out[:, :1], x[:, :1])
    xb = x[:, 1:].reshape(k, 2, D)
    if kind == "shift":
        exp_b = (1 - ALPHA) * xb + ALPHA * xb[(idx - 1) % k]
    else:
        exp_b = (xb + xb.sum(dim=0, keepdim=True)) / (k + 1)
    torch.testing.assert_close(out_b, exp_b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def _x3(B=2, N=10, D=4):
    return torch.randn(B, N, D)


BAD_LINEAR = [
    ("rank 2", lambda: F.linear_transform_noise(torch.randn(3, 4)), ShapeError, ["(3, 4)", "rank 2"]),
    ("rank 5", lambda: F.linear_transform_noise(torch.randn(1, 2, 3, 4, 5)), ShapeError, ["(1, 2, 3, 4, 5)"]),
    ("rank 1", lambda: F.linear_transform_noise(torch.randn(4)), ShapeError, ["(4,)"]),
    ("not a tensor", lambda: F.linear_transform_noise([[[1.0]]]), ShapeError, ["list"]),
    ("int dtype", lambda: F.linear_transform_noise(torch.ones(2, 3, 4, dtype=torch.int64)), ShapeError,
     ["torch.int64"]),
    ("bool dtype", lambda: F.linear_transform_noise(torch.ones(2, 3, 4, dtype=torch.bool)), ShapeError,
     ["torch.bool"]),
    ("empty B", lambda: F.linear_transform_noise(torch.zeros(0, 3, 4)), ShapeError, ["empty", "(0, 3, 4)"]),
    ("empty D", lambda: F.linear_transform_noise(torch.zeros(2, 3, 0)), ShapeError, ["empty", "(2, 3, 0)"]),
    ("empty 4D", lambda: F.linear_transform_noise(torch.zeros(2, 0, 3, 3)), ShapeError, ["empty"]),
    ("prefix == N", lambda: F.linear_transform_noise(_x3(N=3), prefix_tokens=3), ShapeError,
     ["prefix_tokens = 3", "N = 3"]),
    ("prefix > N", lambda: F.linear_transform_noise(_x3(N=3), prefix_tokens=7), ShapeError, ["prefix_tokens = 7"]),
    ("prefix negative", lambda: F.linear_transform_noise(_x3(), prefix_tokens=-1), ConfigError, ["-1"]),
    ("prefix float", lambda: F.linear_transform_noise(_x3(), prefix_tokens=1.0), ConfigError, ["1.0"]),
    ("prefix 4D", lambda: F.linear_transform_noise(torch.randn(2, 3, 4, 4), prefix_tokens=1), ConfigError,
     ["prefix_tokens", "(B, C, H, W)", "1"]),
    ("grid mismatch", lambda: F.linear_transform_noise(_x3(N=7), axis="rows", prefix_tokens=1, grid=(2, 2)),
     ShapeError, ["(2, 2)", "6"]),
    ("grid zero", lambda: F.linear_transform_noise(_x3(N=6), axis="rows", grid=(0, 6)), ShapeError, ["(0, 6)"]),
    ("grid not a pair", lambda: F.linear_transform_noise(_x3(N=6), axis="rows", grid=(1, 2, 3)), ConfigError,
     ["(1, 2, 3)"]),
    ("grid for 4D", lambda: F.linear_transform_noise(torch.randn(2, 3, 4, 4), axis="rows", grid=(4, 4)),
     ConfigError, ["grid"]),
    ("non-square rows", lambda: F.linear_transform_noise(_x3(N=7), axis="rows", prefix_tokens=1), ShapeError,
     ["6", "grid"]),
    ("unknown kind", lambda: F.linear_transform_noise(_x3(), "nope"), ConfigError, ["'nope'"]),
    ("random kind", lambda: F.linear_transform_noise(_x3(), "gaussian"), ConfigError, ["'gaussian'"]),
    ("unknown axis", lambda: F.linear_transform_noise(_x3(), "shift", axis="columns"), ConfigError, ["'columns'"]),
    ("dense no matrix", lambda: F.linear_transform_noise(_x3(N=4), "dense"), QualityMatrixError, ["None"]),
    ("dense wrong size", lambda: F.linear_transform_noise(_x3(N=4), "dense", matrix=torch.zeros(5, 5)),
     QualityMatrixError, ["(5, 5)", "(4, 4)"]),
    ("dense wrong size, check off",
     lambda: F.linear_transform_noise(_x3(N=4), "dense", matrix=torch.zeros(5, 5), check=False),
     QualityMatrixError, ["(5, 5)", "(4, 4)"]),
    ("dense not square", lambda: F.linear_transform_noise(_x3(N=4), "dense", matrix=torch.zeros(4, 3)),
     QualityMatrixError, ["(4, 3)"]),
    ("dense NaN", lambda: F.linear_transform_noise(
        _x3(N=3), "dense", matrix=torch.tensor([[0.0, 0.1, 0.0], [0.0, math.nan, 0.0], [0.0, 0.0, 0.0]])),
     QualityMatrixError, ["non-finite", "nan"]),
    ("dense NaN, check off", lambda: F.linear_transform_noise(
        _x3(N=3), "dense", matrix=torch.tensor([[0.0, 0.1, 0.0], [0.0, math.nan, 0.0], [0.0, 0.0, 0.0]]),
        check=False), QualityMatrixError, ["non-finite"]),
    ("dense inf", lambda: F.linear_transform_noise(
        _x3(N=2), "dense", matrix=torch.tensor([[0.0, math.inf], [0.0, 0.0]])), QualityMatrixError,
     ["non-finite", "inf"]),
    ("dense dominance", lambda: F.linear_transform_noise(
        _x3(N=2), "dense", matrix=torch.tensor([[0.0, 2.0], [0.0, 0.0]])), QualityMatrixError, ["dominance"]),
    ("dense singular", lambda: F.linear_transform_noise(
        _x3(N=2), "dense", matrix=torch.tensor([[0.0, 1.0], [1.0, 0.0]])), QualityMatrixError, ["not invertible"]),
    ("alpha > 1", lambda: F.linear_transform_noise(_x3(), "shift", alpha=1.5), ConfigError, ["1.5"]),
    ("alpha < 0", lambda: F.linear_transform_noise(_x3(), "shift", alpha=-0.2), ConfigError, ["-0.2"]),
    ("alpha nan", lambda: F.linear_transform_noise(_x3(), "shift", alpha=math.nan), ConfigError, ["nan"]),
    ("alpha > 1, check off", lambda: F.linear_transform_noise(_x3(), "shift", alpha=1.5, check=False), ConfigError,
     ["1.5"]),
    ("shift dominance", lambda: F.linear_transform_noise(_x3(), "shift", alpha=0.6), QualityMatrixError,
     ["dominance", "0.6"]),
    ("shift singular", lambda: F.linear_transform_noise(_x3(N=4), "shift", alpha=0.5), QualityMatrixError,
     ["not invertible", "k = 4"]),
]


@pytest.mark.parametrize("name,fn,exc,needles", BAD_LINEAR, ids=[c[0] for c in BAD_LINEAR])
def test_linear_bad_input(name, fn, exc, needles):
    with pytest.raises(exc) as ei:
        fn()
    assert isinstance(ei.value, NoisyNNError)
    msg = str(ei.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("axis", AXES)
def test_shift_dominance_override(axis):
    x = torch.randn(3, 1 + 9, 4, dtype=torch.float64, generator=_gen(31))
    out = call(x, "shift", axis, prefix=1, alpha=0.6, check=False)
    torch.testing.assert_close(out, expected_linear(x, "shift", axis, alpha=0.6, prefix=1), rtol=1e-12, atol=1e-12)


def test_dense_dominance_override():
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=_gen(32))
    Q = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64)
    out = call(x, "dense", "tokens", Q=Q, check=False)
    torch.testing.assert_close(out, expected_linear(x, "dense", "tokens", Q=Q), rtol=1e-12, atol=1e-12)


def test_shift_k1_alpha_above_half_is_fine():
    """k = 1 (B = 1 on the batch axis): the shift is the identity, there is nothing to dominate."""
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(call(x, "shift", "batch", alpha=0.9), x, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# Gaussian noise
# ------------------------------------------------------------------------------------------------
def test_gaussian_seeded_reproducible_and_seed_dependent():
    x = torch.randn(3, 17, 8, generator=_gen(40))
    a = F.gaussian_noise(x, prefix_tokens=1, generator=_gen(123))
    b = F.gaussian_noise(x, prefix_tokens=1, generator=_gen(123))
    c = F.gaussian_noise(x, prefix_tokens=1, generator=_gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 1:], c[:, 1:])
    assert (a[:, 1:] != c[:, 1:]).float().mean() > 0.99


def test_gaussian_global_rng_reproducible_with_manual_seed():
    x = torch.randn(2, 5, 4, 4, generator=_gen(41))
    torch.manual_seed(7)
    a = F.gaussian_noise(x)
    torch.manual_seed(7)
    b = F.gaussian_noise(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


@pytest.mark.parametrize("prefix", (1, 5))
def test_gaussian_prefix_untouched(prefix):
    x = torch.randn(4, 12, 6, generator=_gen(42))
    out = F.gaussian_noise(x, prefix_tokens=prefix, strength=1.0, generator=_gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    assert (out[:, prefix:] != x[:, prefix:]).all()


@pytest.mark.parametrize("strength,mean,std", [(0.1, 0.0, 1.0), (0.5, 2.0, 3.0), (2.0, -1.0, 0.25)])
def test_gaussian_moments(strength, mean, std):
    n = 10 * 1000 * 100
    x = torch.randn(10, 1 + 1000, 100, dtype=torch.float64, generator=_gen(43))
    out = F.gaussian_noise(x, strength=strength, mean=mean, std=std, prefix_tokens=1, generator=_gen(44))
    noise = (out - x)[:, 1:]
    assert noise.numel() == n
    s = strength * std
    se_mean = s / math.sqrt(n)
    se_std = s / math.sqrt(2 * n)
    assert abs(noise.mean().item() - strength * mean) < 5 * se_mean
    assert abs(noise.std().item() - s) < 5 * se_std
    # Gaussian shape: about 68.3% within one std of the mean (binomial SE ~ 4.7e-4)
    within = ((noise - strength * mean).abs() < s).double().mean().item()
    assert abs(within - 0.682689) < 5 * math.sqrt(0.6827 * 0.3173 / n)


def test_gaussian_defaults_are_official():
    x = torch.zeros(4, 250, 1000, dtype=torch.float64)
    out = F.gaussian_noise(x, generator=_gen(45))
    n = out.numel()
    assert abs(out.mean().item()) < 5 * 0.1 / math.sqrt(n)
    assert abs(out.std().item() - 0.1) < 5 * 0.1 / math.sqrt(2 * n)


def test_gaussian_zero_std_or_strength():
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=_gen(46))
    torch.testing.assert_close(F.gaussian_noise(x, std=0.0, mean=2.0, strength=0.5), x + 1.0, rtol=0, atol=1e-15)
    assert torch.equal(F.gaussian_noise(x, strength=0.0), x)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gaussian_half_dtype(dtype):
    x = torch.randn(2, 9, 8, generator=_gen(47))
    ref = F.gaussian_noise(x, prefix_tokens=1, strength=1.0, generator=_gen(5))
    out = F.gaussian_noise(x.to(dtype), prefix_tokens=1, strength=1.0, generator=_gen(5))
    assert out.dtype == dtype
    # same seed, same noise whatever the activation dtype (half types draw in fp32)
    torch.testing.assert_close(out.float(), ref, rtol=2 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)


def test_gaussian_gradient_is_identity():
    x = torch.randn(2, 6, 3, requires_grad=True, generator=_gen(48))
    g = torch.randn(2, 6, 3, generator=_gen(49))
    F.gaussian_noise(x, prefix_tokens=1, generator=_gen(1)).backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(std=-1.0), "std"), (dict(std=math.nan), "std"), (dict(std="a"), "std"),
    (dict(mean=math.inf), "mean"), (dict(strength=math.nan), "strength"),
    (dict(prefix_tokens=12), "prefix_tokens"), (dict(generator=42), "generator"),
])
def test_gaussian_bad_args(kwargs, needle):
    x = torch.randn(2, 12, 3)
    exc = ShapeError if "prefix_tokens" in kwargs else ConfigError
    with pytest.raises(exc, match=needle):
        F.gaussian_noise(x, **kwargs)


def test_gaussian_bad_tensor():
    with pytest.raises(ShapeError):
        F.gaussian_noise(torch.ones(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ShapeError):
        F.gaussian_noise(torch.randn(3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a generator on another device type needs CUDA")
def test_generator_on_wrong_device_type():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ConfigError, match="device"):
        F.gaussian_noise(x, generator=torch.Generator(device="cuda"))
    with pytest.raises(ConfigError, match="device"):
        F.salt_and_pepper_noise(x, 0.1, generator=torch.Generator(device="cuda"))


# ------------------------------------------------------------------------------------------------
# Salt-and-pepper noise
# ------------------------------------------------------------------------------------------------
def _in_range(shape, seed, lo=0.1, hi=0.9, dtype=torch.float32):
    return lo + (hi - lo) * torch.rand(*shape, generator=_gen(seed), dtype=dtype)


def test_snp_seeded_reproducible_and_seed_dependent():
    x = _in_range((3, 33, 8), 50)
    a = F.salt_and_pepper_noise(x, 0.3, prefix_tokens=1, generator=_gen(1))
    b = F.salt_and_pepper_noise(x, 0.3, prefix_tokens=1, generator=_gen(1))
    c = F.salt_and_pepper_noise(x, 0.3, prefix_tokens=1, generator=_gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("prefix", (1, 5))
def test_snp_prefix_untouched(prefix):
    x = _in_range((4, 40, 6), 51)
    out = F.salt_and_pepper_noise(x, 1.0, low=0.0, high=1.0, prefix_tokens=prefix, generator=_gen(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    assert ((out[:, prefix:] == 0) | (out[:, prefix:] == 1)).all()


@pytest.mark.parametrize("p", (0.02, 0.2, 0.5, 1.0))
def test_snp_rates(p):
    x = _in_range((10, 1 + 1000, 100), 52)
    out = F.salt_and_pepper_noise(x, p, low=0.0, high=1.0, prefix_tokens=1, generator=_gen(4))
    body, xb = out[:, 1:], x[:, 1:]
    n = body.numel()
    assert n == 10 ** 6
    salt = (body == 1.0).double().mean().item()
    pepper = (body == 0.0).double().mean().item()
    q = p / 2
    se = math.sqrt(q * (1 - q) / n)
    assert abs(salt - q) < 5 * se + 1e-12, (salt, q)
    assert abs(pepper - q) < 5 * se + 1e-12, (pepper, q)
    kept = (body != 0.0) & (body != 1.0)
    assert torch.equal(body[kept], xb[kept])
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_snp_batch_range_is_the_batch_min_max_of_the_patch_tokens():
    """value_range='batch' (the official latent-level rule): the extremes of the whole batch's patch tokens;
    the class token's are ignored, as the official ViT code takes them over x[:, 1:]."""
    x = _in_range((8, 1 + 400, 16), 53)
    x[2, 0, 3] = -70.0  # extremes in the prefix (class) token: not part of the range
    x[5, 0, 1] = 90.0
    x[3, 7, 2] = -7.0  # the patch tokens' extremes, in two different samples
    x[6, 9, 4] = 9.0
    p = 0.3
    out = F.salt_and_pepper_noise(x, p, prefix_tokens=1, value_range="batch", generator=_gen(5))
    body = out[:, 1:]
    salt, pepper = body == 9.0, body == -7.0
    kept = ~(salt | pepper)
    assert torch.equal(body[kept], x[:, 1:][kept])
    n = body.numel()
    se = math.sqrt(p / 2 * (1 - p / 2) / n)
    assert abs(salt.double().mean().item() - p / 2) < 5 * se
    assert abs(pepper.double().mean().item() - p / 2) < 5 * se
    assert torch.equal(out[:, :1], x[:, :1])


@pytest.mark.parametrize("backend", [b for b in ("reference", "triton") if backend_status(b, "cpu") is None])
def test_snp_default_range_is_each_samples_own_and_batch_independent(backend):
    x = _in_range((4, 1 + 100, 8), 57)
    x[0, 0, 0] = 50.0  # a class-token extreme: ignored
    x[1] *= 10.0       # one sample with a wider range
    kw = dict(seed=8) if backend == "triton" else dict(generator=_gen(8))
    out = F.salt_and_pepper_noise(x, 0.5, prefix_tokens=1, backend=backend, **kw)
    for b in range(4):
        body, changed = x[b, 1:], out[b, 1:] != x[b, 1:]
        assert changed.any()
        assert set(out[b, 1:][changed].unique().tolist()) <= {body.min().item(), body.max().item()}
    # sample 0 gives the same output whatever the other samples are (same random draws)
    other = x.clone()
    other[1:] = _in_range((3, 1 + 100, 8), 58) * 100.0
    kw = dict(seed=8) if backend == "triton" else dict(generator=_gen(8))
    again = F.salt_and_pepper_noise(other, 0.5, prefix_tokens=1, backend=backend, **kw)
    assert torch.equal(again[0], out[0])
    with pytest.raises(ConfigError, match="value_range"):
        F.salt_and_pepper_noise(x, 0.5, value_range="global")


def test_snp_explicit_low_high_are_used():
    x = _in_range((4, 1000, 8), 54)
    out = F.salt_and_pepper_noise(x, 0.5, low=-3.0, high=4.0, generator=_gen(6))
    changed = out != x
    assert changed.any()
    assert set(out[changed].unique().tolist()) == {-3.0, 4.0}
    # only high given: low is still the batch minimum (value_range='batch')
    out = F.salt_and_pepper_noise(x, 0.5, high=4.0, value_range="batch", generator=_gen(6))
    changed = out != x
    assert set(out[changed].unique().tolist()) == {x.min().item(), 4.0}
    # only low given: high is still the batch maximum
    out = F.salt_and_pepper_noise(x, 0.5, low=-3.0, value_range="batch", generator=_gen(6))
    changed = out != x
    assert set(out[changed].unique().tolist()) == {-3.0, x.max().item()}
    # only low given, per-sample range: each sample's own maximum
    out = F.salt_and_pepper_noise(x, 0.5, low=-3.0, generator=_gen(6))
    for b in range(x.shape[0]):
        changed = out[b] != x[b]
        assert set(out[b][changed].unique().tolist()) == {-3.0, x[b].max().item()}


def test_snp_low_equals_high_allowed():
    x = _in_range((2, 50, 4), 55)
    out = F.salt_and_pepper_noise(x, 1.0, low=0.5, high=0.5, generator=_gen(7))
    assert (out == 0.5).all()


@pytest.mark.parametrize("shape,prefix", [((3, 10, 5), 1), ((2, 3, 4, 5), 0)])
def test_snp_p_zero_is_unchanged(shape, prefix):
    x = torch.randn(*shape, generator=_gen(56))
    assert torch.equal(F.salt_and_pepper_noise(x, 0.0, prefix_tokens=prefix, generator=_gen(8)), x)
    assert torch.equal(F.salt_and_pepper_noise(x, 0.0, low=-1.0, high=1.0, prefix_tokens=prefix), x)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float64))
def test_snp_dtypes(dtype):
    x = _in_range((2, 200, 8), 57).to(dtype)
    out = F.salt_and_pepper_noise(x, 0.4, low=0.0, high=1.0, generator=_gen(9))
    assert out.dtype == dtype
    changed = out != x
    assert changed.any() and ((out[changed] == 0) | (out[changed] == 1)).all()


def test_snp_feature_map():
    x = _in_range((2, 3, 20, 20), 58)
    out = F.salt_and_pepper_noise(x, 0.5, low=0.0, high=1.0, generator=_gen(10))
    assert out.shape == x.shape
    changed = out != x
    frac = changed.double().mean().item()
    assert abs(frac - 0.5) < 5 * math.sqrt(0.25 / x.numel())


@pytest.mark.parametrize("explicit", (True, False))
def test_snp_gradient_only_through_untouched(explicit):
    x = _in_range((3, 1 + 64, 8), 59, dtype=torch.float64)
    x[0, 3, 0], x[1, 5, 1] = -7.0, 9.0  # extremes in the patch tokens: the detached ranges of the default rule
    x.requires_grad_(True)
    kw = dict(low=-7.0, high=9.0) if explicit else {}
    p = 0.4
    out = F.salt_and_pepper_noise(x, p, prefix_tokens=1, generator=_gen(11), **kw)
    g = torch.randn(out.shape, dtype=torch.float64, generator=_gen(12))
    out.backward(g)
    u = torch.rand(x[:, 1:].shape, dtype=torch.float64, generator=_gen(11))  # the draws the noise made
    replaced = torch.zeros_like(out, dtype=torch.bool)
    replaced[:, 1:] = (u < p / 2) | (u > 1 - p / 2)
    assert replaced.any() and (~replaced[:, 1:]).any()
    # untouched elements get the upstream gradient, replaced ones none; the detached min/max
    # get nothing from the salt/pepper they were copied to
    expected = torch.where(replaced, torch.zeros_like(g), g)
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("kwargs,needles", [
    (dict(p=-0.1), ["p must", "-0.1"]), (dict(p=1.1), ["p must", "1.1"]), (dict(p=math.nan), ["p must", "nan"]),
    (dict(p="x"), ["p must", "'x'"]), (dict(p=0.1, low=1.0, high=0.0), ["low must be <= high", "1.0", "0.0"]),
    (dict(p=0.1, low=math.nan), ["low", "nan"]), (dict(p=0.1, high=math.inf), ["high", "inf"]),
    (dict(p=0.1, generator="g"), ["generator", "str"]), (dict(p=0.1, prefix_tokens=1.5), ["prefix_tokens", "1.5"]),
])
def test_snp_bad_args(kwargs, needles):
    x = torch.randn(2, 12, 3)
    with pytest.raises(ConfigError) as ei:
        F.salt_and_pepper_noise(x, **kwargs)
    for needle in needles:
        assert needle in str(ei.value), (needle, str(ei.value))


def test_snp_bad_tensor():
    with pytest.raises(ShapeError):
        F.salt_and_pepper_noise(torch.ones(2, 3, 4, dtype=torch.int32), 0.1)
    with pytest.raises(ShapeError):
        F.salt_and_pepper_noise(torch.zeros(2, 0, 4), 0.1)
    with pytest.raises(ShapeError):
        F.salt_and_pepper_noise(torch.randn(2, 3, 4), 0.1, prefix_tokens=3)
    with pytest.raises(ConfigError):
        F.salt_and_pepper_noise(torch.randn(2, 3, 4, 4), 0.1, prefix_tokens=1)


def test_mix_add_layernorm_backend_choice_is_cached_per_call_and_follows_the_environment(monkeypatch):
    """A call site's backend is chosen once (the same call later goes straight to its launcher), but a
    change of NOISYNN_BACKEND takes effect at the next call, a bad value raises on every call, and a
    cached choice never outlives its config."""
    import gc
    import weakref

    from noisynn_kernels import NoiseConfig, _ext, ops
    from noisynn_kernels.errors import BackendUnavailableError

    table = ops.mix_add_layernorm.LAUNCHERS
    chosen, selections = [], []
    for name in ("reference", "cpu"):
        monkeypatch.setitem(table, name, lambda *a, name=name, real=table[name]: chosen.append(name) or real(*a))
    real_select = F.select_backend
    monkeypatch.setattr(F, "select_backend", lambda *a, **k: selections.append(a) or real_select(*a, **k))
    x, r = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w, b = torch.randn(8), torch.randn(8)
    cfg = NoiseConfig(kind="shift", axis="tokens")
    monkeypatch.setenv("NOISYNN_BACKEND", "reference")
    first = F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1)
    again = F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1)
    assert chosen == ["reference", "reference"] and len(selections) == 1  # chosen once
    for one, two in zip(first, again):
        assert torch.equal(one, two)
    monkeypatch.setenv("NOISYNN_BACKEND", "nonsense")
    for _ in range(2):
        with pytest.raises(BackendUnavailableError, match="nonsense"):
            F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1)
    if _ext.backend_status("cpu", "cpu") is None:
        monkeypatch.setenv("NOISYNN_BACKEND", "cpu")
        first = F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1)
        again = F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1)
        assert chosen[2:] == ["cpu"]  # the C++ backends: later calls go straight to the registered op
        for one, two in zip(first, again):
            assert torch.equal(one, two)
    monkeypatch.setenv("NOISYNN_BACKEND", "reference")
    F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1, backend="reference")
    F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1)
    assert chosen[-2:] == ["reference", "reference"]
    ref = weakref.ref(cfg)
    del cfg
    gc.collect()
    assert ref() is None  # the cached choice does not keep the config alive


@pytest.mark.parametrize("kind,axis,straight_through,after,has_res",
                         [("shift", "tokens", False, False, True), ("optimal", "rows", True, False, True),
                          ("identity", "tokens", False, True, False), (None, "tokens", False, False, True)])
def test_mix_add_layernorm_direct_op_calls_match_the_launcher(monkeypatch, kind, axis, straight_through, after,
                                                                has_res):
    """After a call site's first call, the C++ backends' later calls go straight to the registered op
    with the arguments the launcher built: outputs and every gradient are bitwise the launcher's, for
    inputs that require grad and under no_grad."""
    from noisynn_kernels import NoiseConfig, _ext, ops

    if _ext.backend_status("cpu", "cpu") is not None:
        pytest.skip(f"the compiled cpu backend is not built: {_ext.backend_status('cpu', 'cpu')}")
    g = torch.Generator().manual_seed(5)
    leaves = [torch.randn(2, 1 + 12, 24, generator=g), torch.randn(2, 1 + 12, 24, generator=g) if has_res else None,
              torch.randn(24, generator=g), torch.randn(24, generator=g)]
    cfg = None if kind is None else NoiseConfig(kind=kind, axis=axis, straight_through=straight_through)
    gy = [torch.randn(2, 13, 24, generator=g) for _ in range(2)]

    def run(launcher):
        ts = [None if t is None else t.detach().clone().requires_grad_(True) for t in leaves]
        if launcher:
            spec = F.check_mix_add_layernorm(*ts, 1e-6, cfg, 1, (3, 4), after)
            out = ops.mix_add_layernorm.LAUNCHERS["cpu"](*ts, 1e-6, spec, after)
        else:
            out = F.mix_add_layernorm(*ts, 1e-6, mix=cfg, prefix_tokens=1, grid=(3, 4), mix_after_norm=after,
                                      backend="cpu")
        grads = torch.autograd.grad(out, [t for t in ts if t is not None], gy)
        with torch.no_grad():
            out_ng = F.mix_add_layernorm(*leaves, 1e-6, mix=cfg, prefix_tokens=1, grid=(3, 4), mix_after_norm=after,
                                         backend="cpu")
        return [o.detach() for o in out] + list(grads) + list(out_ng)

    expected = run(launcher=True)
    monkeypatch.setattr(F, "_PLANS", {})
    calls = []
    real = ops.mix_add_layernorm.LAUNCHERS["cpu"]
    monkeypatch.setitem(ops.mix_add_layernorm.LAUNCHERS, "cpu", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        got = run(launcher=False)
        assert len(got) == len(expected)
        for a, e in zip(got, expected):
            assert torch.equal(a, e)
    assert len(calls) == 1  # the first call only: the rest went to the op directly


def test_mix_add_layernorm_checks_are_cached_by_metadata(monkeypatch):
    """A call with the metadata of an earlier good call (shapes, dtypes, devices, argument types and values,
    the same config object) reuses its checked spec; anything else is checked again, so bad arguments still
    raise after good ones, and a new config object with equal fields is checked on its own."""
    from noisynn_kernels import NoiseConfig

    calls = []
    real = F.check_mix_add_layernorm
    monkeypatch.setattr(F, "check_mix_add_layernorm", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(F, "_PLANS", {})
    x, r = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w, b = torch.randn(8), torch.randn(8)
    cfg = NoiseConfig(kind="shift", axis="tokens")
    ref = F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1, backend="reference")
    again = F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1, backend="reference")
    assert len(calls) == 1
    for one, two in zip(ref, again):
        assert torch.equal(one, two)
    F.mix_add_layernorm(x, r, w, b, mix=NoiseConfig(kind="shift", axis="tokens"), prefix_tokens=1,
                        backend="reference")
    assert len(calls) == 2  # an equal config, another object
    with pytest.raises(ConfigError, match="prefix_tokens"):
        F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=True, backend="reference")  # True == 1, not an int
    with pytest.raises(ConfigError, match="mix_after_norm"):
        F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1, mix_after_norm=0, backend="reference")
    with pytest.raises(ShapeError, match="bias has shape"):
        F.mix_add_layernorm(x, r, w, torch.randn(7), mix=cfg, prefix_tokens=1, backend="reference")
    with pytest.raises(ShapeError, match="residual has dtype"):
        F.mix_add_layernorm(x, r.double(), w, b, mix=cfg, prefix_tokens=1, backend="reference")
    with pytest.raises(ConfigError, match="grid"):
        F.mix_add_layernorm(x, r, w, b, mix=NoiseConfig(kind="shift", axis="rows"), prefix_tokens=1, grid=(2, True),
                            backend="reference")
    with pytest.raises(ShapeError, match="weight must be a torch.Tensor"):  # not cacheable: the checks' own error
        F.mix_add_layernorm(x, r, [1.0] * 8, b, mix=cfg, prefix_tokens=1, backend="reference")
    with pytest.raises(ConfigError, match="eps"):
        F.mix_add_layernorm(x, r, w, b, [1e-6], mix=cfg, prefix_tokens=1, backend="reference")
    n_failed = len(calls)
    with pytest.raises(ConfigError, match="prefix_tokens"):  # a failed check is never kept
        F.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=True, backend="reference")
    assert len(calls) == n_failed + 1

    import gc
    import weakref

    calls.clear()  # (the spy above keeps its calls' arguments)
    gone = NoiseConfig(kind="optimal", axis="tokens")
    F.mix_add_layernorm(x, r, w, b, mix=gone, prefix_tokens=1, backend="reference")
    assert len(F._PLANS) > 0
    ref = weakref.ref(gone)
    calls.clear()
    del gone
    gc.collect()
    assert ref() is None  # the cache does not keep a config alive
