"""Property-based tests: every backend available here against the reference, over random shapes,
strides (transposed, sliced, expanded views), kinds, axes, prefix tokens and options.

Examples are bounded (and derandomized, so CI runs are reproducible); set ``NOISYNN_FUZZ=<n>`` to run
``n`` times as many random examples locally.  The Triton interpreter is slow, so its cases are tiny.
"""

import functools
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import noisynn_kernels as nk  # noqa: E402
from noisynn_kernels import NoiseConfig, quality, reference  # noqa: E402
from noisynn_kernels._ext import backend_status  # noqa: E402

FUZZ = int(os.environ.get("NOISYNN_FUZZ", "0"))
FUSED = [b for b in ("cpu", "triton") if backend_status(b, "cpu") is None]
MAX_DIMS = {"cpu": dict(B=4, side=4, D=33), "triton": dict(B=2, side=3, D=9)}


def _settings(n):
    return settings(max_examples=n * max(FUZZ, 1), deadline=None, derandomize=not FUZZ, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Strided:
    """A leaf tensor and the view of it that the op gets: contiguous, transposed, sliced or expanded."""

    def __init__(self, base, view, how):
        self.base, self.view, self.how = base, view, how

    def make(self, dtype=torch.float64, requires_grad=False):
        """``(leaf, view)`` in ``dtype``: the view has the drawn strides, gradients land on the leaf."""
        leaf = self.base.to(dtype).requires_grad_(requires_grad)
        return leaf, self.view(leaf)

    def __repr__(self):
        return f"Strided({self.how}, shape={tuple(self.make()[1].shape)})"


def _layout(draw, shape, gen, name):
    """A :class:`Strided` of ``shape`` with random strides."""
    how = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]), label=f"{name} layout")
    n = len(shape)
    if how == "transposed":
        base = torch.randn(*reversed(shape), generator=gen, dtype=torch.float64)
        return Strided(base, lambda t: t.permute(*reversed(range(n))), how)
    if how == "sliced":
        base = torch.randn(*(s * 2 for s in shape), generator=gen, dtype=torch.float64)
        return Strided(base, lambda t: t[tuple(slice(1, None, 2) for _ in range(n))], how)
    if how == "expanded":
        dim = draw(st.integers(0, n - 1), label=f"{name} expanded dim")
        small = list(shape)
        small[dim] = 1
        base = torch.randn(*small, generator=gen, dtype=torch.float64)
        return Strided(base, lambda t: t.expand(*shape), how)
    return Strided(torch.randn(*shape, generator=gen, dtype=torch.float64), lambda t: t, how)


@st.composite
def mix_cases(draw, backend):
    lim = MAX_DIMS[backend]
    B = draw(st.integers(1, lim["B"]), label="B")
    gh, gw = draw(st.integers(1, lim["side"]), label="gh"), draw(st.integers(1, lim["side"]), label="gw")
    prefix = draw(st.integers(0, 2), label="prefix")
    D = draw(st.integers(1, lim["D"]), label="D")
    N = prefix + gh * gw
    kind = draw(st.sampled_from(["identity", "shift", "optimal", "dense"]), label="kind")
    axis = draw(st.sampled_from(["tokens", "rows", "batch"]), label="axis")
    k = {"tokens": gh * gw, "rows": gh, "batch": B}[axis]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1), label="seed"))
    q = 0.3 * torch.rand(k, k, generator=gen, dtype=torch.float64) / k if kind == "dense" else None
    cfg = NoiseConfig(kind=kind, axis=axis, alpha=draw(st.sampled_from([0.0, 0.1, 0.3, 0.5]), label="alpha"),
                      matrix=q, eval=False, check_matrix=False,
                      straight_through=draw(st.booleans(), label="straight_through") and kind != "identity")
    x = _layout(draw, (B, N, D), gen, "x")
    r = _layout(draw, (B, N, D), gen, "residual") if draw(st.booleans(), label="has residual") else None
    w = _layout(draw, (D,), gen, "weight") if draw(st.booleans(), label="has weight") else None
    b = _layout(draw, (D,), gen, "bias") if draw(st.booleans(), label="has bias") else None
    return dict(x=x, r=r, w=w, b=b, cfg=cfg, prefix=prefix, grid=(gh, gw), after=draw(st.booleans(), label="after"),
                eps=draw(st.sampled_from([1e-6, 1e-5, 0.1]), label="eps"))


def _check_against_reference(backend, c):
    """The fused op in fp32 on the drawn strides against the fp64 reference on contiguous copies:
    values of both outputs and every gradient."""
    names = [n for n in ("x", "r", "w", "b") if c[n] is not None]
    made32 = {n: c[n].make(torch.float32, requires_grad=True) for n in names}
    made64 = {n: c[n].make(torch.float64, requires_grad=True) for n in names}
    args32 = [made32[n][1] if n in made32 else None for n in ("x", "r", "w", "b")]
    args64 = [made64[n][1].contiguous() if n in made64 else None for n in ("x", "r", "w", "b")]
    kw = dict(mix=c["cfg"], prefix_tokens=c["prefix"], grid=c["grid"], mix_after_norm=c["after"])
    got = nk.mix_add_layernorm(*args32, c["eps"], backend=backend, **kw)
    exp = nk.mix_add_layernorm(*args64, c["eps"], backend="reference", **kw)
    # fp32 LayerNorm computed as x * rstd - mean * rstd loses |x| * rstd * 2^-24 per term: the bound
    # grows with |x| / std of a row (constant rows with a tiny eps are the extreme; see
    # test_constant_rows_normalize_to_the_bias).
    ln_in = (args64[0] if args64[1] is None else args64[0] + args64[1]).detach()
    if not c["after"]:
        ln_in = exp[1].detach()
    amp = (ln_in.abs().amax(-1) / (ln_in.var(-1, unbiased=False) + c["eps"]).sqrt()).max().item()
    amp *= 1.0 if args64[2] is None else max(1.0, args64[2].abs().max().item())
    for a, e, what, atol in zip(got, exp, ("normed", "residual_out"), (1e-4 + 2 ** -21 * amp, 1e-4)):
        assert a.dtype == torch.float32 and a.shape == e.shape
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=atol, msg=what)
    gen = torch.Generator().manual_seed(0)
    gy = [torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in exp]
    g32 = torch.autograd.grad(got, [made32[n][0] for n in names], [g.float() for g in gy])
    g64 = torch.autograd.grad(exp, [made64[n][0] for n in names], gy)
    gmax = max(g.abs().max().item() for g in gy)
    for a, e, n in zip(g32, g64, names):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=2e-4 * scale + 2 ** -21 * amp * gmax,
                                   msg=f"grad of {n}")


@pytest.mark.skipif("cpu" not in FUSED, reason="the compiled cpu backend is not built")
@_settings(60)
@given(c=mix_cases("cpu"))
def test_cpu_backend_matches_reference(c):
    _check_against_reference("cpu", c)


@pytest.mark.skipif("triton" not in FUSED, reason="no Triton backend on CPU (TRITON_INTERPRET unset)")
@_settings(10)
@given(c=mix_cases("triton"))
def test_triton_backend_matches_reference(c):
    _check_against_reference("triton", c)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("value", (0.3, 2.1, -7.5))
def test_constant_rows_normalize_to_the_bias(backend, value):
    """A row with zero variance normalizes to exactly ``bias`` (torch's LayerNorm gives exact zeros)."""
    x = torch.full((2, 3, 7), value)
    w, b = torch.full((7,), 1.5), torch.linspace(-1, 1, 7)
    normed, res = nk.mix_add_layernorm(x, None, w, b, 1e-6, mix=dict(kind="optimal"), backend=backend)
    torch.testing.assert_close(res, x, rtol=1e-6, atol=0)
    torch.testing.assert_close(normed, b.expand_as(x), rtol=0, atol=1e-6)


@_settings(40)
@given(c=mix_cases("cpu"))
def test_reference_backend_is_layernorm_of_linear_noise(c):
    """The reference mix_add_layernorm is the composition of the public ops (on any strides)."""
    cfg = c["cfg"]
    x, r, w, b = (None if c[n] is None else c[n].make()[1] for n in ("x", "r", "w", "b"))
    normed, res = nk.mix_add_layernorm(x, r, w, b, c["eps"], mix=cfg, prefix_tokens=c["prefix"], grid=c["grid"],
                                       mix_after_norm=c["after"], backend="reference")
    s = x if r is None else x + r

    def mix(t):
        return nk.linear_transform_noise(t, cfg.kind, axis=cfg.axis, alpha=cfg.alpha, matrix=cfg.matrix,
                                         prefix_tokens=c["prefix"], grid=c["grid"] if cfg.axis == "rows" else None,
                                         check=False)

    ln = lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:], w, b, c["eps"])  # noqa: E731
    exp_n, exp_r = (mix(ln(s)), s) if c["after"] else (ln(mix(s)), mix(s))
    torch.testing.assert_close(normed, exp_n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res, exp_r, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# linear_transform_noise: the O(k d) paths against the explicit (I + Q) X product, any layout


@st.composite
def linear_cases(draw):
    fmap = draw(st.booleans(), label="feature map")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1), label="seed"))
    kind = draw(st.sampled_from(["identity", "shift", "optimal", "dense"]), label="kind")
    axis = draw(st.sampled_from(["tokens", "rows", "batch"]), label="axis")
    alpha = draw(st.floats(0.0, 0.5), label="alpha")
    B = draw(st.integers(1, 4), label="B")
    if fmap:
        C, H, W = (draw(st.integers(1, 4), label=n) for n in "CHW")
        if draw(st.booleans(), label="channels_last"):
            x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64).contiguous(
                memory_format=torch.channels_last)
        else:
            x = _layout(draw, (B, C, H, W), gen, "x").make()[1]
        prefix, grid = 0, None
        k = {"tokens": H * W, "rows": H, "batch": B}[axis]
    else:
        gh, gw = draw(st.integers(1, 4), label="gh"), draw(st.integers(1, 4), label="gw")
        prefix = draw(st.integers(0, 2), label="prefix")
        x = _layout(draw, (B, prefix + gh * gw, draw(st.integers(1, 7), label="D")), gen, "x").make()[1]
        grid = (gh, gw)
        k = {"tokens": gh * gw, "rows": gh, "batch": B}[axis]
    q = 0.4 * torch.rand(k, k, generator=gen, dtype=torch.float64) / k if kind == "dense" else None
    return x, kind, axis, alpha, q, prefix, grid, k


def _explicit(x, kind, axis, alpha, q, prefix, grid, k):
    """(I + Q) X with the dense k x k matrix, in fp64, from a contiguous copy (the definition)."""
    M = quality.mixing_matrix(kind, k, alpha=alpha, matrix=q)
    xc = x.contiguous()
    head, body = (xc[:, :prefix], xc[:, prefix:]) if x.dim() == 3 else (None, xc)
    v = body.reshape(reference.mixed_view_shape(x.shape, axis, prefix, grid if axis == "rows" else None))
    out = torch.einsum("ij,ojd->oid", M, v).reshape(body.shape)
    return out if head is None else torch.cat([head, out], dim=1)


@_settings(80)
@given(case=linear_cases())
def test_linear_noise_matches_explicit_product(case):
    x, kind, axis, alpha, q, prefix, grid, k = case
    y = nk.linear_transform_noise(x, kind, axis=axis, alpha=alpha, matrix=q, prefix_tokens=prefix,
                                  grid=grid if axis == "rows" else None, check=False)
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _explicit(*case), rtol=1e-12, atol=1e-12)
    if prefix:
        assert torch.equal(y[:, :prefix], x[:, :prefix])


# --------------------------------------------------------------------------------------------------
# random noises: invariants of the reference and the fused kernels


RANDOM = [(b, functools.partial(nk.gaussian_noise, backend=b), functools.partial(nk.salt_and_pepper_noise, backend=b))
          for b in ("reference", "triton") if backend_status(b, "cpu") is None]


@st.composite
def random_cases(draw, tiny):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1), label="seed"))
    if draw(st.booleans(), label="feature map"):
        shape = tuple(draw(st.integers(1, 3 if tiny else 5), label=n) for n in "BCHW")
        prefix = 0
    else:
        B, N, D = (draw(st.integers(1, 3 if tiny else 6), label=n) for n in "BND")
        N += 1
        shape, prefix = (B, N, D), draw(st.integers(0, N - 1), label="prefix")
    x = _layout(draw, shape, gen, "x").make(torch.float32)[1]
    return x, prefix, draw(st.integers(0, 2 ** 20), label="noise seed"), draw(st.floats(0.0, 1.0), label="p")


@pytest.mark.parametrize("name,gaussian,snp", RANDOM, ids=[r[0] for r in RANDOM])
def test_random_noise_invariants(name, gaussian, snp):
    @_settings(25 if name == "reference" else 8)
    @given(case=random_cases(tiny=name == "triton"))
    def check(case):
        x, prefix, seed, p = case
        gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
        y = gaussian(x, strength=0.5, prefix_tokens=prefix, generator=gen())
        assert y.shape == x.shape and y.dtype == x.dtype
        torch.testing.assert_close(gaussian(x, strength=0.5, prefix_tokens=prefix, generator=gen()), y, rtol=0, atol=0)
        torch.testing.assert_close(gaussian(x.contiguous(), strength=0.5, prefix_tokens=prefix, generator=gen()), y,
                                   rtol=0, atol=0)
        assert torch.equal(gaussian(x, strength=0.0, prefix_tokens=prefix, generator=gen()), x)
        z = snp(x, p, low=-7.0, high=7.0, prefix_tokens=prefix, generator=gen())
        torch.testing.assert_close(snp(x.contiguous(), p, low=-7.0, high=7.0, prefix_tokens=prefix, generator=gen()),
                                   z, rtol=0, atol=0)
        assert bool(((z == x) | (z == 7.0) | (z == -7.0)).all())
        if prefix:
            assert torch.equal(y[:, :prefix], x[:, :prefix]) and torch.equal(z[:, :prefix], x[:, :prefix])
        assert torch.equal(snp(x, 0.0, prefix_tokens=prefix, generator=gen()), x)
        if x[:, prefix:].numel() if x.dim() == 3 else x.numel():
            full = snp(x, 1.0, low=-7.0, high=7.0, prefix_tokens=prefix, generator=gen())
            body = full[:, prefix:] if x.dim() == 3 else full
            assert bool(((body == 7.0) | (body == -7.0)).all())

    check()
