"""Quality matrices of linear transform noise.

NoisyNN's positive noise is ``eps = Q X``: the network sees ``X' = (I + Q) X``, where the ``k``
rows of ``X`` are mixed by the ``k x k`` *quality matrix* ``Q``.  ``M = I + Q`` is the *mixing
matrix*.  This module builds the published matrices, checks the conditions the paper puts on
``M`` and computes the paper's entropy change ``dS = -log|det M|``.

Dense matrices built here are for inspection, validation and tests.  The noise ops never multiply
by a dense ``k x k`` matrix for the structured kinds (``shift``, ``optimal``): see
:func:`noisynn_kernels.linear_transform_noise`.
"""

from __future__ import annotations

import math
import operator

import torch

from ._checks import shift_direction, traced
from ._op_codes import KIND_CODES
from .errors import ConfigError, QualityMatrixError

__all__ = [
    "LINEAR_KINDS",
    "DEFAULT_ALPHA",
    "shift",
    "optimal",
    "mixing_matrix",
    "validate",
    "check_structured",
    "check_alpha",
    "as_square",
    "entropy_change",
    "shift_entropy_change",
    "optimal_entropy_change",
]

#: Kinds of linear transform noise, i.e. the kinds that have a mixing matrix (those with an op code).
LINEAR_KINDS = tuple(KIND_CODES)

#: Default strength ``a`` of the circular-shift quality matrix.
DEFAULT_ALPHA = 0.3


def _check_k(k) -> int:
    # operator.index takes Python and NumPy ints and integer 0-d tensors (torch.jit.trace turns sizes
    # into those) and rejects floats and strings; bool is an int subclass but never a size.
    if traced(k):  # a size traced by torch.compile with dynamic shapes: it is >= 1 by construction
        return k
    bad = ConfigError(f"k must be a positive int (the number of mixed rows), got {k!r}")
    if isinstance(k, bool):
        raise bad
    try:
        k = operator.index(k)
    except TypeError:
        raise bad from None
    if k < 1:
        raise ConfigError(f"k must be >= 1 (the number of mixed rows), got {k}")
    return k


def check_alpha(alpha) -> float:
    """``alpha`` as a float in ``[0, 1]`` (the shift strength); else :class:`ConfigError`."""
    if traced(alpha):
        return alpha
    if isinstance(alpha, bool):  # float(True) == 1.0 would pass silently
        raise ConfigError(f"alpha must be a number in [0, 1], got {alpha!r}")
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not math.isfinite(a) or not 0.0 <= a <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1] (the shift strength), got {alpha!r}")
    return a


def shift(k: int, alpha: float = DEFAULT_ALPHA, *, shift: int = 1, dtype=torch.float64, device=None) -> torch.Tensor:
    """Circular-shift quality matrix ``Q = -a I + a P``.

    ``shift = +1`` (the paper's): ``P[(i+1) mod k, i] = 1``, so row ``i`` of ``(I + Q) X`` is
    ``(1 - a) x_i + a x_{(i-1) mod k}``.  ``shift = -1`` (the official CNN code): ``P`` transposed, row
    ``i`` is ``(1 - a) x_i + a x_{(i+1) mod k}``.  Both have the same determinant, dominance and ``dS``.
    For ``k = 1`` the shift is the identity permutation, so ``Q = 0``.
    """
    return _shift_q(_check_k(k), check_alpha(alpha), shift_direction(shift), dtype, device)


def _shift_q(k: int, a: float, s: int, dtype, device) -> torch.Tensor:
    eye = torch.eye(k, dtype=dtype, device=device)
    perm = torch.roll(eye, shifts=s, dims=0)  # perm[(i+s) % k, i] = 1
    return a * perm - a * eye


def optimal(k: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Optimal quality matrix ``Q = -(k/(k+1)) I + (1/(k+1)) 1 1^T``.

    Row ``i`` of ``(I + Q) X`` is ``(x_i + sum_j x_j) / (k + 1)``.
    """
    k = _check_k(k)
    eye = torch.eye(k, dtype=dtype, device=device)
    ones = torch.ones(k, k, dtype=dtype, device=device)
    return ones / (k + 1) - eye * (k / (k + 1))


def mixing_matrix(kind: str, k: int, alpha: float = DEFAULT_ALPHA, matrix: torch.Tensor | None = None,
                  *, shift: int = 1, dtype=torch.float64, device=None) -> torch.Tensor:
    """The mixing matrix ``M = I + Q`` for ``kind`` in ``identity|shift|optimal|dense``.

    ``shift`` is the direction of the ``shift`` kind (see :func:`shift`).

    For ``dense``, ``matrix`` is the user's quality matrix ``Q`` (``k x k``); ``M = I + matrix``.
    The result is not validated: call :func:`validate` for that.
    """
    k = _check_k(k)
    eye = torch.eye(k, dtype=dtype, device=device)
    if kind == "identity":
        return eye
    if kind == "shift":
        return eye + _shift_q(k, check_alpha(alpha), shift_direction(shift), dtype, device)
    if kind == "optimal":
        return eye + optimal(k, dtype=dtype, device=device)
    if kind == "dense":
        q = as_square(matrix, "matrix")
        if q.shape[0] != k:
            raise QualityMatrixError(
                f"dense quality matrix has size {tuple(q.shape)}, expected ({k}, {k}) for k = {k} mixed rows")
        return eye + q.to(dtype=dtype, device=eye.device)  # Q may live on another device than M
    raise ConfigError(f"kind must be one of {LINEAR_KINDS} to have a mixing matrix, got {kind!r}")


def as_square(m, name: str) -> torch.Tensor:
    """``m`` as a real, non-empty ``k x k`` floating-point tensor with data (a non-float one in float64);
    else :class:`QualityMatrixError` naming ``name``."""
    if m is None:
        raise QualityMatrixError(f"{name} is required for kind='dense' (a k x k quality matrix Q), got None")
    if not isinstance(m, torch.Tensor):
        try:
            m = torch.as_tensor(m, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise QualityMatrixError(f"{name} must be a k x k tensor, got {type(m).__name__}: {e}") from None
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise QualityMatrixError(f"{name} is not square: expected a k x k matrix, got shape {tuple(m.shape)}")
    if m.shape[0] == 0:
        raise QualityMatrixError(f"{name} is empty (0 x 0): expected k >= 1")
    if m.is_complex():  # a cast to real would drop the imaginary part with only a warning
        raise QualityMatrixError(f"{name} has complex dtype {m.dtype}: expected a real k x k matrix")
    if m.device.type == "meta":
        raise QualityMatrixError(f"{name} is on the meta device (shape only, no values): expected a matrix "
                                 "with data, on any device (it is moved to the activations' device)")
    if not m.is_floating_point():
        m = m.to(torch.float64)
    return m


def validate(M: torch.Tensor, *, dominance: bool = True, invertible: bool = True, rtol: float = 1e-9) -> torch.Tensor:
    """Check the conditions NoisyNN puts on a mixing matrix ``M = I + Q``; return ``M`` unchanged.

    Raises :class:`QualityMatrixError` naming the first violated condition:

    - *not square*: ``M`` must be ``k x k``;
    - *non-finite*: every entry must be finite;
    - *not invertible*: ``M`` must have full rank (checked in float64 with an SVD rank tolerance);
    - *dominance*: each row keeps most of its own information, ``M[i,i] >= M[i,j]`` for ``j != i``
      (up to ``rtol`` times the largest magnitude in the row).

    ``dominance=False`` / ``invertible=False`` skip those two checks: the explicit override the
    paper's conditions allow for experiments outside them.
    """
    M = as_square(M, "M")
    m = M.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(m).all():
        bad = (~torch.isfinite(m)).nonzero()[0].tolist()
        raise QualityMatrixError(f"M is non-finite: entry {tuple(bad)} is {m[tuple(bad)].item()}; "
                                 "expected every entry of I + Q to be finite")
    k = m.shape[0]
    if invertible:
        rank = int(torch.linalg.matrix_rank(m).item())
        if rank < k:
            raise QualityMatrixError(
                f"M = I + Q is not invertible: rank {rank} < k = {k} (det = {torch.linalg.det(m).item():.3g}); "
                "NoisyNN requires I + Q to be full rank. Pass invertible=False to override.")
    if dominance and k > 1:
        diag = m.diagonal()
        off = m.clone()
        off.fill_diagonal_(-math.inf)
        row_max, col = off.max(dim=1)
        scale = m.abs().amax(dim=1).clamp_min(1.0)
        broken = (diag < row_max - rtol * scale).nonzero().flatten()
        if broken.numel():
            i = int(broken[0])
            j = int(col[i])
            raise QualityMatrixError(
                f"M = I + Q breaks dominance in row {i}: M[{i},{i}] = {diag[i].item():.6g} < "
                f"M[{i},{j}] = {row_max[i].item():.6g}; expected M[i,i] >= M[i,j] for all j != i "
                "(each sample stays the dominant source of its own output). Pass dominance=False to override.")
    return M


def check_structured(kind: str, k: int, alpha: float = DEFAULT_ALPHA, *, dominance: bool = True,
                     invertible: bool = True) -> None:
    """:func:`validate` for ``identity``, ``shift`` and ``optimal`` from closed forms, in O(1).

    ``shift``: invertible iff ``(1-a)^k != (-a)^k``; dominant iff ``a <= 0.5`` (for ``k >= 2``).
    ``optimal`` and ``identity`` always pass.
    """
    if traced(k) or traced(alpha):
        # torch.compile with dynamic shapes: the closed forms need values; the eager call checked them
        # (and NoiseConfig checks alpha's dominance bound at construction)
        return
    k = _check_k(k)
    if kind in ("identity", "optimal"):
        return
    if kind != "shift":
        raise ConfigError(f"check_structured takes identity|shift|optimal, got {kind!r}")
    a = check_alpha(alpha)
    if invertible and math.isinf(_shift_log_abs_det(k, a)):
        raise QualityMatrixError(
            f"shift mixing matrix with alpha = {a} and k = {k} is not invertible: det = (1-a)^k - (-a)^k = 0; "
            "NoisyNN requires I + Q to be full rank (alpha = 0.5 is singular for even k). "
            "Pass invertible=False to override.")
    if dominance and k > 1 and a > 0.5:
        raise QualityMatrixError(
            f"shift mixing matrix with alpha = {a} breaks dominance: M[i,i] = 1 - alpha = {1 - a:.6g} < "
            f"M[i,i-1] = alpha = {a:.6g}; expected alpha <= 0.5. Pass dominance=False to override.")


def entropy_change(M: torch.Tensor) -> float:
    """The paper's entropy change of the transform, ``dS = -log|det M|`` (natural log, via slogdet in
    float64).  Positive ``dS`` counts as positive noise.  ``inf`` for a singular ``M``."""
    M = as_square(M, "M")
    sign, logabsdet = torch.linalg.slogdet(M.detach().to(device="cpu", dtype=torch.float64))
    if sign.item() == 0:
        return math.inf
    return -float(logabsdet)


def _shift_log_abs_det(k: int, a: float) -> float:
    """``ln|(1-a)^k - (-a)^k|`` without underflow: factor out the larger power,
    ``det = b^k (1 - (c/b)^k)`` with ``{b, c} = {1-a, -a}`` and ``|c/b| <= 1``.  ``-inf`` when singular."""
    big, small = (1.0 - a, -a) if a <= 0.5 else (-a, 1.0 - a)
    rest = 1.0 - (small / big) ** k
    # (c/b)^k == 1 only for |c/b| == 1 and even k (a = 0.5): exactly singular.
    if abs(rest) <= 1e-15:
        return -math.inf
    return k * math.log(abs(big)) + math.log(abs(rest))


def shift_entropy_change(k: int, alpha: float = DEFAULT_ALPHA) -> float:
    """Closed form of :func:`entropy_change` for the shift matrix: ``-ln|(1-a)^k - (-a)^k|``
    (computed in log space, so large ``k`` does not underflow); ``inf`` when singular."""
    k = _check_k(k)
    a = check_alpha(alpha)
    return -_shift_log_abs_det(k, a)


def optimal_entropy_change(k: int) -> float:
    """Closed form of :func:`entropy_change` for the optimal matrix: ``(k-1) ln(k+1)``."""
    k = _check_k(k)
    return (k - 1) * math.log(k + 1)
