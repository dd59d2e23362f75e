"""Bad input to the public ops, on every backend available here: a NoisyNNError subclass that says what
was given and what was expected, never a crash inside a kernel and never a wrong result.

Cases already pinned by tests/test_functional.py (linear_transform_noise: rank, grid, prefix, dense
size / NaN / singular / dominance, alpha) are not repeated here; this file covers mix_add_layernorm on
every backend, the fused random noises, the policy cases (empty tensors, mixed dtypes, devices, strides)
and the validation bugs fixed with it.

Policy, the same for every public op and backend:

- an empty tensor (any dimension 0, the batch included) raises ShapeError: there is no row to mix and
  a batch-axis mix of zero samples has no matrix (``k >= 1`` always holds for an accepted input);
- ``weight`` / ``bias`` of mix_add_layernorm may have any floating dtype; outputs have ``x``'s dtype;
  ``residual`` must have ``x``'s dtype;
- every tensor argument must be on ``x``'s device; a dense ``Q`` may be on any device with data (it is
  moved), never on ``meta``;
- non-contiguous, expanded (stride 0) and channels_last inputs are computed, never rejected.
"""

import math

import pytest
import torch

import noisynn_kernels as nk
from noisynn_kernels import (
    BackendUnavailableError,
    ConfigError,
    NoiseConfig,
    NoisyNNError,
    QualityMatrixError,
    ShapeError,
    reference,
)
from noisynn_kernels._ext import backend_status

BACKENDS = [b for b in ("reference", "cpu", "triton") if backend_status(b, "cpu") is None]
TRITON_NOISE = backend_status("triton", "cpu") is None


def _raises(exc, fn, *needles):
    with pytest.raises(exc) as ei:
        fn()
    assert isinstance(ei.value, NoisyNNError), type(ei.value)
    msg = str(ei.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return ei.value


def test_backends_under_test():
    # the point of this file is the fused backends: make sure they really run here
    assert "reference" in BACKENDS and "cpu" in BACKENDS
    if backend_status("triton", "cpu") is None:
        assert "triton" in BACKENDS


# --------------------------------------------------------------------------------------------------
# mix_add_layernorm: the matrix of bad arguments, on every backend

X = lambda *shape: torch.randn(*shape)  # noqa: E731
D8 = torch.ones(8)
META8 = torch.ones(8, device="meta")

MAL_BAD = [
    # (id, kwargs, exception, needles)
    ("x rank 2", dict(x=X(5, 8)), ShapeError, ["(5, 8)", "rank 2"]),
    ("x rank 4", dict(x=X(1, 2, 5, 8)), ShapeError, ["(B, N, D)", "(1, 2, 5, 8)"]),
    ("x not a tensor", dict(x=[[[1.0]]]), ShapeError, ["list"]),
    ("x int", dict(x=torch.ones(2, 5, 8, dtype=torch.int32)), ShapeError, ["torch.int32"]),
    ("x bool", dict(x=torch.ones(2, 5, 8, dtype=torch.bool)), ShapeError, ["torch.bool"]),
    ("empty batch", dict(x=X(0, 5, 8)), ShapeError, ["empty", "(0, 5, 8)"]),
    ("empty tokens", dict(x=X(2, 0, 8)), ShapeError, ["empty"]),
    ("empty D", dict(x=X(2, 5, 0)), ShapeError, ["empty"]),
    ("residual int", dict(residual=torch.ones(2, 5, 8, dtype=torch.int64)), ShapeError, ["residual", "int64"]),
    ("residual dtype", dict(residual=X(2, 5, 8).half()), ShapeError, ["residual has dtype torch.float16",
                                                                      "torch.float32"]),
    ("residual shape", dict(residual=X(2, 5, 7)), ShapeError, ["residual has shape (2, 5, 7)", "(2, 5, 8)"]),
    ("residual broadcastable", dict(residual=X(1, 5, 8)), ShapeError, ["(1, 5, 8)"]),
    ("residual meta", dict(residual=X(2, 5, 8).to("meta")), ShapeError, ["residual is on meta", "cpu"]),
    ("weight meta", dict(weight=META8), ShapeError, ["weight is on meta"]),
    ("bias meta", dict(weight=D8, bias=META8), ShapeError, ["bias is on meta"]),
    ("weight int", dict(weight=torch.ones(8, dtype=torch.int64)), ShapeError, ["weight", "int64"]),
    ("bias bool", dict(bias=torch.ones(8, dtype=torch.bool)), ShapeError, ["bias", "bool"]),
    ("weight shape", dict(weight=torch.ones(1, 8)), ShapeError, ["weight has shape (1, 8)", "(8,)"]),
    ("bias shape", dict(bias=torch.ones(7)), ShapeError, ["bias has shape (7,)"]),
    ("weight not a tensor", dict(weight=[1.0] * 8), ShapeError, ["weight", "list"]),
    ("prefix == N", dict(prefix_tokens=5), ShapeError, ["prefix_tokens = 5", "N = 5"]),
    ("prefix > N", dict(prefix_tokens=9), ShapeError, ["prefix_tokens = 9"]),
    ("prefix negative", dict(prefix_tokens=-1), ConfigError, ["-1"]),
    ("prefix bool", dict(prefix_tokens=True), ConfigError, ["True"]),
    ("eps 0", dict(eps=0.0), ConfigError, ["eps"]),
    ("eps nan", dict(eps=math.nan), ConfigError, ["eps", "nan"]),
    ("eps inf", dict(eps=math.inf), ConfigError, ["eps"]),
    ("mix_after_norm int", dict(mix_after_norm=1), ConfigError, ["mix_after_norm", "1"]),
    ("mix random kind", dict(mix="salt_and_pepper"), ConfigError, ["linear transform noise", "salt_and_pepper"]),
    ("mix unknown kind", dict(mix="nope"), ConfigError, ["'nope'"]),
    ("mix bad type", dict(mix=3), ConfigError, ["int"]),
    ("mix unknown field", dict(mix=dict(kind="shift", beta=1)), ConfigError, ["beta"]),
    ("alpha > 1", dict(mix=dict(kind="shift", alpha=1.5)), ConfigError, ["alpha", "1.5"]),
    ("alpha < 0", dict(mix=dict(kind="shift", alpha=-0.1)), ConfigError, ["alpha", "-0.1"]),
    ("alpha nan", dict(mix=dict(kind="shift", alpha=math.nan)), ConfigError, ["alpha", "nan"]),
    ("alpha bool", dict(mix=dict(kind="shift", alpha=True)), ConfigError, ["alpha", "True"]),
    ("shift dominance", dict(mix=dict(kind="shift", alpha=0.7)), QualityMatrixError, ["dominance"]),
    ("shift singular (k=4)", dict(x=X(2, 5, 8), prefix_tokens=1, mix=dict(kind="shift", alpha=0.5)),
     QualityMatrixError, ["not invertible", "k = 4"]),
    ("rows grid mismatch", dict(mix=dict(kind="shift", axis="rows"), grid=(2, 3)), ShapeError,
     ["(2, 3)", "5 patch tokens"]),
    ("rows grid not square", dict(mix=dict(kind="optimal", axis="rows")), ShapeError, ["grid", "5"]),
    ("rows grid float", dict(mix=dict(kind="optimal", axis="rows"), grid=(5.0, 1.0)), ConfigError, ["grid"]),
    ("rows grid truncating float", dict(mix=dict(kind="optimal", axis="rows"), grid=(5.9, 1)), ConfigError,
     ["5.9"]),
    ("rows grid bool", dict(mix=dict(kind="optimal", axis="rows"), grid=(5, True)), ConfigError, ["grid"]),
    ("rows grid string", dict(mix=dict(kind="optimal", axis="rows"), grid="51"), ConfigError, ["grid"]),
    ("dense no matrix", dict(mix=dict(kind="dense")), ConfigError, ["matrix"]),
    ("dense wrong size", dict(mix=dict(kind="dense", matrix=torch.zeros(4, 4))), ShapeError,
     ["(4, 4)", "(5, 5)", "k = 5"]),
    ("dense wrong size (batch axis)", dict(mix=dict(kind="dense", axis="batch", eval=False, matrix=torch.zeros(5, 5))),
     ShapeError, ["(5, 5)", "(2, 2)"]),
    ("dense not square", dict(mix=dict(kind="dense", matrix=torch.zeros(5, 4))), QualityMatrixError, ["(5, 4)"]),
    ("dense singular", dict(mix=dict(kind="dense", matrix=-torch.eye(5))), QualityMatrixError,
     ["not invertible"]),
    ("dense not dominant", dict(mix=dict(kind="dense", matrix=2 * torch.diag(torch.ones(4), 1))), QualityMatrixError,
     ["dominance"]),
    ("dense NaN", dict(mix=dict(kind="dense", matrix=torch.full((5, 5), math.nan))), QualityMatrixError,
     ["non-finite"]),
    ("dense inf, checks off", dict(mix=dict(kind="dense", check_matrix=False,
                                            matrix=torch.eye(5).index_fill(1, torch.tensor([2]), math.inf))),
     QualityMatrixError, ["non-finite", "inf"]),
    ("dense meta", dict(mix=dict(kind="dense", matrix=torch.zeros(5, 5, device="meta"))), QualityMatrixError,
     ["meta"]),
    ("dense complex", dict(mix=dict(kind="dense", matrix=torch.zeros(5, 5, dtype=torch.complex64))),
     QualityMatrixError, ["complex"]),
    ("batch axis at eval", dict(mix=dict(kind="optimal", axis="batch")), nk.BatchDependenceError,
     ["allow_batch_dependence"]),
]


def _mal_call(backend, kw):
    kw = dict(kw)
    x = kw.pop("x", None)
    x = X(2, 5, 8) if x is None else x
    return nk.mix_add_layernorm(x, kw.pop("residual", None), kw.pop("weight", None), kw.pop("bias", None),
                                kw.pop("eps", 1e-6), backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw,exc,needles", MAL_BAD, ids=[c[0] for c in MAL_BAD])
def test_mix_add_layernorm_bad_input(backend, name, kw, exc, needles):
    _raises(exc, lambda: _mal_call(backend, kw), *needles)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fused_backends_name_what_they_cannot_run(backend):
    x = X(2, 5, 8)
    _raises(BackendUnavailableError, lambda: nk.mix_add_layernorm(x.to("meta"), backend=backend), "meta")
    _raises(ShapeError, lambda: nk.mix_add_layernorm(x.double(), backend=backend), "float64")
    if backend == "triton":
        _raises(BackendUnavailableError, lambda: nk.mix_add_layernorm(x.bfloat16(), backend=backend), "bfloat16")


def test_reference_backend_takes_meta_tensors_for_shapes():
    x = torch.empty(2, 5, 8, device="meta")
    normed, res = nk.mix_add_layernorm(x, x, torch.ones(8, device="meta"), None, mix=dict(kind="shift", axis="tokens"),
                                       prefix_tokens=1, backend="reference")
    assert normed.shape == res.shape == (2, 5, 8) and normed.device.type == "meta"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_backend_name(backend):
    _raises(BackendUnavailableError, lambda: nk.mix_add_layernorm(X(2, 5, 8), backend=backend + "x"), "not a backend")


# --------------------------------------------------------------------------------------------------
# mixed dtypes of weight / bias: accepted, the result has x's dtype and the same value on every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype,b_dtype", [
    (torch.float32, torch.bfloat16, None),
    (torch.float32, torch.float64, torch.float64),
    (torch.float32, torch.float32, torch.float16),
    (torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
])
def test_mixed_parameter_dtypes_keep_x_dtype(backend, x_dtype, w_dtype, b_dtype):
    if backend == "triton" and x_dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16")
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(2, 5, 8, generator=g).to(x_dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(8, generator=g)).to(w_dtype)
    b = None if b_dtype is None else (0.1 * torch.randn(8, generator=g)).to(b_dtype)
    mix = dict(kind="shift", axis="tokens")
    normed, res = nk.mix_add_layernorm(x, r, w, b, mix=mix, prefix_tokens=1, backend=backend)
    assert normed.dtype == res.dtype == x_dtype
    # oracle: fp64 computation on the same (already rounded) values, rounded once to x's dtype
    e_n, e_r = reference.mix_add_layernorm(x.double(), r.double(), w.double(), None if b is None else b.double(),
                                           1e-6, kind="shift", prefix_tokens=1)
    tol = dict(rtol=0, atol=1e-5) if x_dtype == torch.float32 else dict(rtol=0, atol=3e-2)
    torch.testing.assert_close(normed.double(), e_n, **tol)
    torch.testing.assert_close(res.double(), e_r, **tol)


# --------------------------------------------------------------------------------------------------
# k = 1 (one mixed row): the mix is the identity for shift and optimal, 1 + q for dense


K1_CASES = [  # (x shape, axis, prefix, grid)
    ((3, 2, 8), "tokens", 1, None),     # one patch token
    ((3, 5, 8), "rows", 1, (1, 4)),     # one grid row
    ((1, 5, 8), "batch", 0, None),      # one sample
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("shape,axis,prefix,grid", K1_CASES, ids=[c[1] for c in K1_CASES])
@pytest.mark.parametrize("after", (False, True))
def test_k_equals_one(backend, kind, shape, axis, prefix, grid, after):
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    w, b = 1 + 0.1 * torch.randn(8, generator=g), 0.1 * torch.randn(8, generator=g)
    q = torch.tensor([[-0.25]]) if kind == "dense" else None
    cfg = NoiseConfig(kind=kind, axis=axis, alpha=0.45, matrix=q, eval=axis != "batch")
    assert nk.functional.mixed_size(x, axis, prefix, grid) == 1
    normed, res = nk.mix_add_layernorm(x, r, w, b, 1e-5, mix=cfg, prefix_tokens=prefix, grid=grid,
                                       mix_after_norm=after, backend=backend)
    plain_n, plain_r = nk.mix_add_layernorm(x, r, w, b, 1e-5, prefix_tokens=prefix, backend="reference")
    scale = torch.ones(shape[1], 1)
    if kind == "dense":
        scale[prefix:] = 0.75
    if after:
        exp_n, exp_r = plain_n * scale, plain_r
    else:
        exp_r = plain_r * scale
        exp_n = torch.nn.functional.layer_norm(exp_r, (8,), w, b, 1e-5)
    torch.testing.assert_close(res, exp_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normed, exp_n, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ("shift", "optimal"))
def test_linear_noise_k_equals_one_is_identity(kind):
    for x, axis, prefix in ((torch.randn(2, 2, 3), "tokens", 1), (torch.randn(1, 3, 4, 4), "batch", 0),
                            (torch.randn(2, 3, 1, 5), "rows", 0), (torch.randn(2, 3, 1, 1), "tokens", 0)):
        # (1 - a) x + a x: x up to rounding
        torch.testing.assert_close(nk.linear_transform_noise(x, kind, axis=axis, alpha=0.4, prefix_tokens=prefix), x,
                                   rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# non-contiguous, expanded and channels_last inputs: computed, and equal to the contiguous result


LAYOUTS = {
    # name: (shapes of the leaf tensors, views (x, residual, weight, bias) of them)
    "transposed": (lambda B, N, D: [(B, D, N), (N, B, D), (D,), (D,)],
                   lambda x, r, w, b: (x.transpose(1, 2), r.transpose(0, 1), w, b)),
    "sliced": (lambda B, N, D: [(B, N, 2 * D), (B, N + 2, D), (2 * D,), (3 * D,)],
               lambda x, r, w, b: (x[:, :, ::2], r[:, 1:-1], w[::2], b[D_:2 * D_])),
    "expanded": (lambda B, N, D: [(1, N, D), (B, 1, D), (1,), (D,)],
                 lambda x, r, w, b: (x.expand(B_, *x.shape[1:]), r.expand(-1, N_, -1), w.expand(D_), b)),
}
B_, N_, D_ = 3, 5, 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind,axis", [("optimal", "tokens"), ("shift", "rows"), ("dense", "batch")])
@pytest.mark.parametrize("after", (False, True))
def test_mix_add_layernorm_strided_inputs_match_contiguous(backend, layout, kind, axis, after):
    g = torch.Generator().manual_seed(2)
    prefix = 1
    k = {"tokens": N_ - prefix, "rows": 2, "batch": B_}[axis]
    q = 0.1 * torch.rand(k, k, generator=g) if kind == "dense" else None
    cfg = NoiseConfig(kind=kind, axis=axis, matrix=q, eval=axis != "batch")
    grid = (2, 2) if axis == "rows" else None
    shapes, views = LAYOUTS[layout]
    leaves = [torch.randn(*sh, generator=g).requires_grad_() for sh in shapes(B_, N_, D_)]
    strided = views(*leaves)
    assert [tuple(t.shape) for t in strided] == [(B_, N_, D_)] * 2 + [(D_,)] * 2
    assert not all(t.is_contiguous() for t in strided)
    kw = dict(mix=cfg, prefix_tokens=prefix, grid=grid, mix_after_norm=after)
    got = nk.mix_add_layernorm(*strided, 1e-5, backend=backend, **kw)
    exp = nk.mix_add_layernorm(*[t.contiguous() for t in strided], 1e-5, backend="reference", **kw)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    gy = [torch.randn(B_, N_, D_, generator=g) for _ in range(2)]
    grads = torch.autograd.grad(got, leaves, gy)
    exp_grads = torch.autograd.grad(exp, leaves, gy)
    for a, e, name in zip(grads, exp_grads, "xrwb"):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")


# --------------------------------------------------------------------------------------------------
# linear_transform_noise: the cases test_functional.py does not cover (validation bugs fixed here)


def test_linear_noise_flags_must_be_bools():
    x = X(2, 5, 4)
    # a truthy string used to switch the straight-through gradient on, "no" the checks on
    _raises(ConfigError, lambda: nk.linear_transform_noise(x, "shift", straight_through="no"), "straight_through",
            "'no'")
    _raises(ConfigError, lambda: nk.linear_transform_noise(x, "shift", check=0), "check", "0")


def test_linear_noise_bool_alpha_rejected_even_with_checks_off():
    # alpha=True used to run as alpha = 1.0 with check=False
    _raises(ConfigError, lambda: nk.linear_transform_noise(X(2, 5, 4), "shift", alpha=True, check=False), "alpha",
            "True")


@pytest.mark.parametrize("grid", [(2.5, 2), (2.9, 2.0), (True, 4), "22", (2,)], ids=repr)
def test_linear_noise_grid_must_be_ints(grid):
    # (2.9, 2.0) used to be truncated to (2, 2) and accepted for 4 patch tokens
    _raises(ConfigError, lambda: nk.linear_transform_noise(X(2, 4, 3), "shift", axis="rows", grid=grid), "grid")


def test_linear_noise_grid_accepts_int_like():
    x = X(2, 4, 3)
    exp = nk.linear_transform_noise(x, "shift", axis="rows", grid=(2, 2))
    for grid in [(torch.tensor(2), torch.tensor(2)), torch.Size([2, 2]), [2, 2]]:
        assert torch.equal(nk.linear_transform_noise(x, "shift", axis="rows", grid=grid), exp)


@pytest.mark.parametrize("matrix,needle", [
    (torch.zeros(5, 5, dtype=torch.complex64), "complex"),      # used to drop the imaginary part silently
    (torch.zeros(5, 5, device="meta"), "meta"),                  # used to fail inside torch with no context
], ids=["complex", "meta"])
@pytest.mark.parametrize("check", (True, False))
def test_linear_noise_dense_matrix_without_real_values(matrix, needle, check):
    _raises(QualityMatrixError, lambda: nk.linear_transform_noise(X(2, 5, 4), "dense", matrix=matrix, check=check),
            needle)
    _raises(QualityMatrixError, lambda: NoiseConfig(kind="dense", matrix=matrix, check_matrix=check), needle)


def test_dense_matrix_int_and_list_are_real_matrices():
    x = X(2, 3, 4)
    exp = nk.linear_transform_noise(x, "dense", matrix=torch.zeros(3, 3))
    assert torch.equal(nk.linear_transform_noise(x, "dense", matrix=torch.zeros(3, 3, dtype=torch.int64)), exp)
    assert torch.equal(nk.linear_transform_noise(x, "dense", matrix=[[0.0] * 3] * 3), exp)
    assert torch.equal(exp, x)


# --------------------------------------------------------------------------------------------------
# random noises: the reference and the fused (Triton) backends


RANDOM_FNS = [("gaussian", lambda x, **kw: nk.gaussian_noise(x, **kw)),
              ("salt_and_pepper", lambda x, **kw: nk.salt_and_pepper_noise(x, kw.pop("p", 0.2), **kw))]
if TRITON_NOISE:
    RANDOM_FNS += [("gaussian fused", lambda x, **kw: nk.gaussian_noise(x, backend="triton", **kw)),
                   ("salt_and_pepper fused",
                    lambda x, **kw: nk.salt_and_pepper_noise(x, kw.pop("p", 0.2), backend="triton", **kw))]

RANDOM_BAD = [
    ("rank 2", dict(x=X(5, 8)), ShapeError, ["rank 2"]),
    ("rank 5", dict(x=X(1, 1, 2, 5, 8)), ShapeError, ["(1, 1, 2, 5, 8)"]),
    ("int", dict(x=torch.ones(2, 5, 8, dtype=torch.int16)), ShapeError, ["torch.int16"]),
    ("empty batch", dict(x=X(0, 5, 8)), ShapeError, ["empty"]),
    ("empty fmap", dict(x=X(2, 3, 0, 4)), ShapeError, ["empty"]),
    ("prefix == N", dict(prefix_tokens=5), ShapeError, ["prefix_tokens = 5"]),
    ("prefix on fmap", dict(x=X(2, 3, 4, 4), prefix_tokens=1), ConfigError, ["prefix_tokens"]),
    ("generator not a generator", dict(generator=0), ConfigError, ["generator", "int"]),
]
GAUSS_BAD = [
    ("std < 0", dict(std=-1.0), ConfigError, ["std"]),
    ("strength nan", dict(strength=math.nan), ConfigError, ["strength"]),
    ("mean inf", dict(mean=math.inf), ConfigError, ["mean"]),
    ("std bool", dict(std=True), ConfigError, ["std", "True"]),
]
SNP_BAD = [
    ("p > 1", dict(p=1.5), ConfigError, ["p", "1.5"]),
    ("p < 0", dict(p=-0.1), ConfigError, ["p", "-0.1"]),
    ("p nan", dict(p=math.nan), ConfigError, ["p"]),
    ("p None", dict(p=None), ConfigError, ["p", "None"]),
    ("p bool", dict(p=True), ConfigError, ["p", "True"]),     # used to run as p = 1.0
    ("low > high", dict(low=1.0, high=0.0), ConfigError, ["low", "high"]),
    ("low nan", dict(low=math.nan), ConfigError, ["low"]),
]


def _random_cases():
    for fname, fn in RANDOM_FNS:
        extra = GAUSS_BAD if fname.startswith("gaussian") else SNP_BAD
        for case in RANDOM_BAD + extra:
            yield pytest.param(fn, *case[1:], id=f"{fname}: {case[0]}")


@pytest.mark.parametrize("fn,kw,exc,needles", list(_random_cases()))
def test_random_noise_bad_input(fn, kw, exc, needles):
    kw = dict(kw)
    x = kw.pop("x", None)
    x = X(2, 5, 8) if x is None else x
    _raises(exc, lambda: fn(x, **kw), *needles)


@pytest.mark.skipif(not TRITON_NOISE, reason="no Triton here")
def test_fused_random_noise_bad_seed_and_device():
    x = X(2, 5, 8)
    for fn in (lambda x, **kw: nk.gaussian_noise(x, backend="triton", **kw),
               lambda x, **kw: nk.salt_and_pepper_noise(x, 0.1, backend="triton", **kw)):
        _raises(ConfigError, lambda fn=fn: fn(x, seed=-1), "seed")
        _raises(ConfigError, lambda fn=fn: fn(x, seed=1.5), "seed")
        _raises(ConfigError, lambda fn=fn: fn(x, seed=1, generator=torch.Generator()), "either seed or generator")
        _raises(BackendUnavailableError, lambda fn=fn: fn(x.to("meta")), "meta")


@pytest.mark.parametrize("fname,fn", RANDOM_FNS, ids=[f[0] for f in RANDOM_FNS])
@pytest.mark.parametrize("layout", ("channels_last", "transposed", "sliced"))
def test_random_noise_strided_input_matches_contiguous(fname, fn, layout):
    g = torch.Generator().manual_seed(3)
    if layout == "channels_last":
        x = torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(2, 6, 7, generator=g).transpose(1, 2)
    else:
        x = torch.randn(2, 7, 12, generator=g)[:, :, ::2]
    assert not x.is_contiguous()
    prefix = 1 if x.dim() == 3 else 0
    a = fn(x, prefix_tokens=prefix, generator=torch.Generator().manual_seed(7))
    b = fn(x.contiguous(), prefix_tokens=prefix, generator=torch.Generator().manual_seed(7))
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, x)  # the noise did something


# --------------------------------------------------------------------------------------------------
# empty tensors: one policy (ShapeError) for every public op and backend


def test_empty_batch_is_a_shape_error_everywhere():
    e3, e4 = torch.zeros(0, 5, 8), torch.zeros(0, 3, 4, 4)
    calls = [lambda: nk.linear_transform_noise(e3, "optimal"), lambda: nk.linear_transform_noise(e4, "shift"),
             lambda: nk.linear_transform_noise(e3, "shift", axis="batch"),
             lambda: nk.gaussian_noise(e3), lambda: nk.salt_and_pepper_noise(e4, 0.1)]
    calls += [lambda b=b: nk.mix_add_layernorm(e3, e3, backend=b) for b in BACKENDS]
    if TRITON_NOISE:
        calls += [lambda: nk.gaussian_noise(e3, backend="triton"),
                  lambda: nk.salt_and_pepper_noise(e4, 0.1, backend="triton")]
    calls += [lambda: nk.NoiseInjection("optimal").train()(e3), lambda: nk.NoiseInjection("gaussian").train()(e4)]
    for call in calls:
        _raises(ShapeError, call, "empty")
