"""Tests of noisynn_kernels.quality: the quality / mixing matrices, their checks and entropy change.

Expected values are written out from the definitions in NOISYNN_SPEC.md, element by element.
"""

import math

import pytest
import torch

from noisynn_kernels import quality
from noisynn_kernels.errors import ConfigError, NoisyNNError, QualityMatrixError

KS = (1, 2, 3, 4, 5, 7, 8, 16)
ALPHAS = (0.0, 0.1, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0)


def _shift_by_definition(k, a):
    """Q = -a I + a P with P[(i+1) mod k, i] = 1, built entry by entry."""
    q = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        q[i, i] -= a
        q[(i + 1) % k, i] += a
    return q


def _optimal_by_definition(k):
    """Q = -(k/(k+1)) I + 1/(k+1) 1 1^T, built entry by entry."""
    q = torch.empty(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            q[i, j] = 1.0 / (k + 1) - (k / (k + 1) if i == j else 0.0)
    return q


# ------------------------------------------------------------------------------------------------
# Definitions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("alpha", (0.0, 0.3, 0.5, 1.0))
def test_shift_matches_definition(k, alpha):
    q = quality.shift(k, alpha)
    assert q.shape == (k, k)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q, _shift_by_definition(k, alpha), rtol=0, atol=1e-15)


def test_shift_default_alpha_is_0_3():
    assert quality.DEFAULT_ALPHA == 0.3
    torch.testing.assert_close(quality.shift(5), _shift_by_definition(5, 0.3), rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", (3, 6))
def test_shift_row_form(k):
    """Row i of (I + Q) X is (1 - a) x_i + a x_{(i-1) mod k}."""
    a = 0.3
    x = torch.randn(k, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = (torch.eye(k, dtype=torch.float64) + quality.shift(k, a)) @ x
    for i in range(k):
        torch.testing.assert_close(y[i], (1 - a) * x[i] + a * x[(i - 1) % k], rtol=0, atol=1e-14)


@pytest.mark.parametrize("k", (1, 2, 3, 6))
def test_reverse_shift_row_form(k):
    """``shift=-1``: row i of (I + Q) X is (1 - a) x_i + a x_{(i+1) mod k}; Q is the +1 shift's transpose, with
    the same determinant (so the same dS, invertibility and dominance)."""
    a = 0.4
    x = torch.randn(k, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q = quality.shift(k, a, shift=-1)
    torch.testing.assert_close(q, quality.shift(k, a).T, rtol=0, atol=0)
    M = quality.mixing_matrix("shift", k, a, shift=-1)
    torch.testing.assert_close(M, torch.eye(k, dtype=torch.float64) + q, rtol=0, atol=0)
    y = M @ x
    for i in range(k):
        torch.testing.assert_close(y[i], (1 - a) * x[i] + a * x[(i + 1) % k], rtol=0, atol=1e-14)
    assert quality.entropy_change(M) == pytest.approx(quality.shift_entropy_change(k, a), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("bad", (0, 2, 1.0, True))
def test_shift_direction_is_checked(bad):
    with pytest.raises(ConfigError, match="shift must be"):
        quality.shift(4, 0.3, shift=bad)
    with pytest.raises(ConfigError, match="shift must be"):
        quality.mixing_matrix("shift", 4, 0.3, shift=bad)


@pytest.mark.parametrize("k", KS)
def test_optimal_matches_definition(k):
    q = quality.optimal(k)
    assert q.shape == (k, k)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q, _optimal_by_definition(k), rtol=0, atol=1e-15)
    # M = (I + 1 1^T) / (k + 1)
    m = torch.eye(k, dtype=torch.float64) + q
    expected_m = (torch.eye(k, dtype=torch.float64) + torch.ones(k, k, dtype=torch.float64)) / (k + 1)
    torch.testing.assert_close(m, expected_m, rtol=0, atol=1e-15)


def test_dtype_and_device_arguments():
    q = quality.shift(4, 0.3, dtype=torch.float32, device="cpu")
    assert q.dtype == torch.float32 and q.device.type == "cpu"
    q = quality.optimal(4, dtype=torch.float32)
    assert q.dtype == torch.float32
    m = quality.mixing_matrix("optimal", 4, dtype=torch.float32)
    assert m.dtype == torch.float32


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("kind", ("identity", "shift", "optimal"))
@pytest.mark.parametrize("alpha", (0.0, 0.3, 0.5, 0.9))
def test_unit_row_sums(kind, k, alpha):
    m = quality.mixing_matrix(kind, k, alpha)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# mixing_matrix
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", KS)
def test_mixing_matrix_identity(k):
    m = quality.mixing_matrix("identity", k)
    assert torch.equal(m, torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("alpha", (0.0, 0.25, 0.5))
def test_mixing_matrix_shift(k, alpha):
    m = quality.mixing_matrix("shift", k, alpha)
    torch.testing.assert_close(m, torch.eye(k, dtype=torch.float64) + _shift_by_definition(k, alpha),
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", KS)
def test_mixing_matrix_optimal(k):
    m = quality.mixing_matrix("optimal", k)
    torch.testing.assert_close(m, torch.eye(k, dtype=torch.float64) + _optimal_by_definition(k), rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", (1, 3, 6))
def test_mixing_matrix_dense_is_i_plus_q(k):
    q = torch.randn(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    m = quality.mixing_matrix("dense", k, matrix=q)
    torch.testing.assert_close(m, torch.eye(k, dtype=torch.float64) + q, rtol=0, atol=0)
    # the user's Q is the quality matrix, not M: it must not be modified in place
    torch.testing.assert_close(q, torch.randn(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k)),
                               rtol=0, atol=0)


def test_mixing_matrix_dense_accepts_float32_and_lists():
    q32 = torch.full((3, 3), 0.1, dtype=torch.float32)
    m = quality.mixing_matrix("dense", 3, matrix=q32)
    assert m.dtype == torch.float64
    torch.testing.assert_close(m, torch.eye(3, dtype=torch.float64) + q32.double(), rtol=0, atol=0)
    m = quality.mixing_matrix("dense", 2, matrix=[[0.0, 0.1], [0.2, 0.0]])
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.1], [0.2, 1.0]], dtype=torch.float64), rtol=0, atol=0)


def test_mixing_matrix_dense_errors():
    with pytest.raises(QualityMatrixError, match="None"):
        quality.mixing_matrix("dense", 3)
    with pytest.raises(QualityMatrixError, match=r"\(4, 4\).*\(3, 3\)"):
        quality.mixing_matrix("dense", 3, matrix=torch.zeros(4, 4))
    with pytest.raises(QualityMatrixError, match="not square"):
        quality.mixing_matrix("dense", 3, matrix=torch.zeros(3, 4))


def test_mixing_matrix_unknown_kind():
    with pytest.raises(ConfigError, match="gaussian"):
        quality.mixing_matrix("gaussian", 3)
    with pytest.raises(ConfigError, match="nope"):
        quality.mixing_matrix("nope", 3)


# ------------------------------------------------------------------------------------------------
# validate
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [
    torch.eye(3, dtype=torch.float64),
    quality.mixing_matrix("shift", 5, 0.3),
    quality.mixing_matrix("shift", 4, 0.5 - 1e-6),
    quality.mixing_matrix("shift", 5, 0.5),  # odd k: alpha = 0.5 is invertible and dominance holds with ties
    quality.mixing_matrix("optimal", 7),
    torch.tensor([[2.0, 1.0], [0.5, 1.0]], dtype=torch.float64),
    torch.tensor([[5.0]], dtype=torch.float64),
])
def test_validate_passes_valid_matrices(m):
    out = quality.validate(m)
    assert out is m or torch.equal(out, m)


def test_validate_returns_input_unchanged():
    m = quality.mixing_matrix("shift", 4, 0.3, dtype=torch.float32)
    out = quality.validate(m)
    assert out.dtype == torch.float32
    assert torch.equal(out, m)


@pytest.mark.parametrize("m", [torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, 2, 2)])
def test_validate_not_square(m):
    with pytest.raises(QualityMatrixError, match="not square") as ei:
        quality.validate(m)
    assert str(tuple(m.shape)) in str(ei.value)


def test_validate_empty():
    with pytest.raises(QualityMatrixError, match="empty"):
        quality.validate(torch.zeros(0, 0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_validate_non_finite(bad):
    m = torch.eye(3, dtype=torch.float64)
    m[1, 2] = bad
    with pytest.raises(QualityMatrixError, match="non-finite") as ei:
        quality.validate(m)
    assert "(1, 2)" in str(ei.value)
    # non-finite is reported even with both overrides
    with pytest.raises(QualityMatrixError, match="non-finite"):
        quality.validate(m, dominance=False, invertible=False)


@pytest.mark.parametrize("k", (2, 4, 6, 10))
def test_validate_not_invertible_shift_half_even_k(k):
    m = quality.mixing_matrix("shift", k, 0.5)
    with pytest.raises(QualityMatrixError, match="not invertible"):
        quality.validate(m)
    # override: dominance holds (ties), so invertible=False passes
    quality.validate(m, invertible=False)


def test_validate_not_invertible_generic():
    m = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(QualityMatrixError, match="not invertible"):
        quality.validate(m)
    quality.validate(m, invertible=False)


def test_validate_dominance_broken_dense():
    q = torch.tensor([[0.0, 0.2, 0.1],
                      [0.1, 0.0, 0.0],
                      [0.0, 1.5, 0.0]], dtype=torch.float64)  # row 2: M[2,1] = 1.5 > M[2,2] = 1
    m = torch.eye(3, dtype=torch.float64) + q
    with pytest.raises(QualityMatrixError, match="dominance") as ei:
        quality.validate(m)
    msg = str(ei.value)
    assert "row 2" in msg and "M[2,1]" in msg
    quality.validate(m, dominance=False)  # invertible, so the override passes


def test_validate_dominance_broken_shift():
    m = quality.mixing_matrix("shift", 5, 0.6)
    with pytest.raises(QualityMatrixError, match="dominance"):
        quality.validate(m)
    quality.validate(m, dominance=False)


def test_validate_dominance_tie_passes():
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    quality.validate(m)


def test_validate_override_flags_are_independent():
    # singular and dominance-broken at once
    m = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(QualityMatrixError, match="not invertible"):
        quality.validate(m)
    with pytest.raises(QualityMatrixError, match="dominance"):
        quality.validate(m, invertible=False)
    with pytest.raises(QualityMatrixError, match="not invertible"):
        quality.validate(m, dominance=False)
    quality.validate(m, invertible=False, dominance=False)


def test_quality_matrix_error_is_in_family():
    assert issubclass(QualityMatrixError, NoisyNNError)
    assert issubclass(QualityMatrixError, ValueError)
    assert issubclass(ConfigError, NoisyNNError)


# ------------------------------------------------------------------------------------------------
# check_structured agrees with validate(mixing_matrix(...))
# ------------------------------------------------------------------------------------------------
def _outcome(fn):
    try:
        fn()
    except QualityMatrixError as e:
        msg = str(e)
        if "not invertible" in msg:
            return "not invertible"
        if "dominance" in msg:
            return "dominance"
        return "other: " + msg
    return "ok"


@pytest.mark.parametrize("kind", ("identity", "shift", "optimal"))
@pytest.mark.parametrize("dominance", (True, False))
@pytest.mark.parametrize("invertible", (True, False))
def test_check_structured_agrees_with_validate(kind, dominance, invertible):
    ks = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16)
    alphas = (0.0, 0.05, 0.2, 0.3, 0.4, 0.49, 0.5, 0.51, 0.6, 0.7, 0.9, 1.0)
    for k in ks:
        for a in (alphas if kind == "shift" else (0.3,)):
            fast = _outcome(lambda k=k, a=a: quality.check_structured(kind, k, a, dominance=dominance,
                                                                      invertible=invertible))
            slow = _outcome(lambda k=k, a=a: quality.validate(quality.mixing_matrix(kind, k, a), dominance=dominance,
                                                              invertible=invertible))
            assert fast == slow, (kind, k, a, fast, slow)


def test_check_structured_known_outcomes():
    quality.check_structured("shift", 4, 0.3)
    quality.check_structured("shift", 5, 0.5)
    quality.check_structured("optimal", 100)
    quality.check_structured("identity", 100)
    with pytest.raises(QualityMatrixError, match="not invertible"):
        quality.check_structured("shift", 4, 0.5)
    with pytest.raises(QualityMatrixError, match="dominance"):
        quality.check_structured("shift", 3, 0.6)
    quality.check_structured("shift", 3, 0.6, dominance=False)
    quality.check_structured("shift", 4, 0.5, invertible=False)
    # k = 1: the shift is the identity permutation, Q = 0
    quality.check_structured("shift", 1, 0.9)


# Exact det of the shift mixing matrix is (1-a)^k - (-a)^k, zero only for a = 0.5 with even k.  For large k
# both powers underflow in float64, yet the matrix stays invertible (its smallest singular value is
# min_j |1 - a + a w^j| over the k-th roots of unity w, far from 0 for these alphas).
LARGE_K_SHIFT = [(1075, 0.5), (2101, 0.3), (5000, 0.3), (20000, 0.1), (20000, 0.3)]


@pytest.mark.parametrize("k,alpha", LARGE_K_SHIFT)
def test_check_structured_shift_large_k_is_invertible(k, alpha):
    quality.check_structured("shift", k, alpha)


def _log_space_shift_entropy(k, a):
    # -ln|(1-a)^k - (-a)^k| = -k ln(1-a) - ln|1 - (-a/(1-a))^k|, no underflow
    r = -a / (1 - a)
    return -(k * math.log(1 - a) + math.log(abs(1 - r ** k)))


@pytest.mark.parametrize("k,alpha", LARGE_K_SHIFT)
def test_shift_entropy_change_large_k_is_finite(k, alpha):
    assert quality.shift_entropy_change(k, alpha) == pytest.approx(_log_space_shift_entropy(k, alpha), rel=1e-12)


def test_entropy_change_large_k_agrees_with_closed_form():
    k, a = 1075, 0.5
    expected = _log_space_shift_entropy(k, a)
    assert expected == pytest.approx((k - 1) * math.log(2), rel=1e-12)  # det = 2 * 2^-k for odd k
    got = quality.entropy_change(quality.mixing_matrix("shift", k, a))
    assert got == pytest.approx(expected, rel=1e-9)
    assert quality.shift_entropy_change(k, a) == pytest.approx(got, rel=1e-9)


def test_check_structured_bad_kind():
    with pytest.raises(ConfigError, match="dense"):
        quality.check_structured("dense", 3)


# ------------------------------------------------------------------------------------------------
# Entropy change
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", (1, 2, 3, 4, 5, 8, 13, 32))
@pytest.mark.parametrize("alpha", (0.0, 0.1, 0.3, 0.4, 0.49, 0.6, 0.9))
def test_entropy_change_shift_closed_form(k, alpha):
    m = quality.mixing_matrix("shift", k, alpha)
    got = quality.entropy_change(m)
    closed = quality.shift_entropy_change(k, alpha)
    by_hand = -math.log(abs((1 - alpha) ** k - (-alpha) ** k))
    assert got == pytest.approx(closed, rel=1e-10, abs=1e-12)
    assert closed == pytest.approx(by_hand, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("k", (1, 2, 3, 4, 7, 16, 50))
def test_entropy_change_optimal_closed_form(k):
    m = quality.mixing_matrix("optimal", k)
    got = quality.entropy_change(m)
    closed = quality.optimal_entropy_change(k)
    assert closed == pytest.approx((k - 1) * math.log(k + 1), rel=1e-14, abs=0)
    assert got == pytest.approx(closed, rel=1e-10, abs=1e-12)
    if k > 1:
        assert got > 0  # positive noise


def test_entropy_change_identity_is_zero():
    assert quality.entropy_change(torch.eye(6, dtype=torch.float64)) == pytest.approx(0.0, abs=1e-15)


def test_entropy_change_dense_matches_det():
    m = torch.tensor([[2.0, 0.5], [0.25, -1.0]], dtype=torch.float64)
    det = 2.0 * -1.0 - 0.5 * 0.25
    assert quality.entropy_change(m) == pytest.approx(-math.log(abs(det)), rel=1e-13)


def test_entropy_change_float32_input_computed_in_float64():
    m = quality.mixing_matrix("optimal", 20, dtype=torch.float32)
    assert quality.entropy_change(m) == pytest.approx(quality.optimal_entropy_change(20), rel=1e-6)


@pytest.mark.parametrize("m", [
    torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64),
    torch.zeros(3, 3, dtype=torch.float64),
    quality.mixing_matrix("shift", 2, 0.5),
    quality.mixing_matrix("shift", 4, 0.5),
])
def test_entropy_change_singular_is_inf(m):
    assert quality.entropy_change(m) == math.inf


@pytest.mark.parametrize("k", (2, 4, 8))
def test_shift_entropy_change_singular_closed_form_is_inf(k):
    assert quality.shift_entropy_change(k, 0.5) == math.inf


def test_entropy_change_not_square():
    with pytest.raises(QualityMatrixError, match="not square"):
        quality.entropy_change(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------
# Bad k / alpha
# ------------------------------------------------------------------------------------------------
BAD_KS = (0, -1, 2.0, 2.5, "3", None, True)
BAD_ALPHAS = (-0.1, 1.1, math.nan, math.inf, "x", None)


@pytest.mark.parametrize("k", BAD_KS)
def test_bad_k_raises_config_error(k):
    for fn in (lambda: quality.shift(k), lambda: quality.optimal(k), lambda: quality.mixing_matrix("identity", k),
               lambda: quality.check_structured("optimal", k), lambda: quality.shift_entropy_change(k),
               lambda: quality.optimal_entropy_change(k)):
        with pytest.raises(ConfigError, match="k must be") as ei:
            fn()
        assert repr(k) in str(ei.value) or str(k) in str(ei.value)


@pytest.mark.parametrize("alpha", BAD_ALPHAS)
def test_bad_alpha_raises_config_error(alpha):
    for fn in (lambda: quality.shift(3, alpha), lambda: quality.mixing_matrix("shift", 3, alpha),
               lambda: quality.check_structured("shift", 3, alpha), lambda: quality.shift_entropy_change(3, alpha)):
        with pytest.raises(ConfigError, match="alpha") as ei:
            fn()
        assert repr(alpha) in str(ei.value)
