"""Tests of NoiseConfig (noisynn_kernels.config) and the NoiseInjection module (noisynn_kernels.nn)."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from noisynn_kernels import quality
from noisynn_kernels.config import KINDS, POSITIONS, RANDOM_KINDS, NoiseConfig
from noisynn_kernels.errors import BatchDependenceError, ConfigError, NoisyNNError, QualityMatrixError
from noisynn_kernels.nn import NoiseInjection


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def small_q(k=4):
    """A dense Q with M = I + Q strictly diagonally dominant (valid)."""
    return (torch.rand(k, k, generator=_gen(k), dtype=torch.float64) * 2 - 1) * (0.4 / k)


# ------------------------------------------------------------------------------------------------
# Defaults and valid configs
# ------------------------------------------------------------------------------------------------
def test_defaults():
    c = NoiseConfig()
    assert c.kind == "optimal"
    assert c.axis == "tokens"
    assert c.layer == -1
    assert c.position == "block_input"
    assert c.alpha == pytest.approx(quality.DEFAULT_ALPHA) and c.alpha == 0.3
    assert (c.std, c.mean, c.strength) == (1.0, 0.0, 0.1)  # official Gaussian defaults
    assert c.matrix is None and c.low is None and c.high is None and c.seed is None
    assert c.train is True and c.eval is True
    assert c.straight_through is False and c.allow_batch_dependence is False and c.check_matrix is True
    assert c.is_linear and not c.is_random and not c.mixes_batch


def test_module_constants():
    assert set(KINDS) == {"identity", "shift", "optimal", "dense", "gaussian", "salt_and_pepper"}
    assert set(RANDOM_KINDS) == {"gaussian", "salt_and_pepper"}
    assert set(POSITIONS) == {"block_input", "attn_input", "attn_output", "image"}


@pytest.mark.parametrize("kwargs", [
    dict(kind="identity"), dict(kind="shift", alpha=0.5), dict(kind="shift", alpha=0.0),
    dict(kind="optimal", axis="rows"),
    dict(kind="dense", matrix=small_q()), dict(kind="gaussian", std=0.0, mean=-2.0, strength=3.0, seed=1),
    dict(kind="salt_and_pepper", p=1.0, low=0.0, high=1.0), dict(kind="salt_and_pepper", p=0.0, low=1.0, high=1.0),
    dict(layer=0), dict(layer=11), dict(layer=-3), dict(position="attn_input"), dict(position="image"),
    dict(straight_through=True, kind="shift"), dict(train=False, eval=False),
])
def test_valid_configs(kwargs):
    c = NoiseConfig(**kwargs)
    for k, v in kwargs.items():
        got = getattr(c, k)
        if isinstance(v, torch.Tensor):
            assert torch.equal(got, v)
        else:
            assert got == v


def test_frozen():
    c = NoiseConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.kind = "shift"


def test_numbers_are_stored_as_float():
    c = NoiseConfig(kind="shift", alpha=0, std=2, p=1, low=0, high=1)
    assert isinstance(c.alpha, float) and isinstance(c.std, float) and isinstance(c.p, float)
    assert isinstance(c.low, float) and isinstance(c.high, float)


# ------------------------------------------------------------------------------------------------
# Invalid fields
# ------------------------------------------------------------------------------------------------
INVALID = [
    (dict(kind="nope"), ConfigError, ["kind", "'nope'"]),
    (dict(kind="Optimal"), ConfigError, ["kind", "'Optimal'"]),
    (dict(axis="columns"), ConfigError, ["axis", "'columns'"]),
    (dict(position="head"), ConfigError, ["position", "'head'"]),
    (dict(kind="shift", alpha=1.5), ConfigError, ["alpha", "1.5"]),
    (dict(kind="shift", alpha=-0.1), ConfigError, ["alpha", "-0.1"]),
    (dict(kind="shift", alpha=math.nan), ConfigError, ["alpha", "nan"]),
    (dict(kind="shift", alpha=True), ConfigError, ["alpha", "True"]),
    (dict(kind="shift", alpha="big"), ConfigError, ["alpha", "'big'"]),
    (dict(kind="salt_and_pepper", p=1.2), ConfigError, ["p must", "1.2"]),
    (dict(kind="salt_and_pepper", p=-0.5), ConfigError, ["p must", "-0.5"]),
    (dict(kind="gaussian", std=-1.0), ConfigError, ["std", "-1.0"]),
    (dict(kind="gaussian", std=math.inf), ConfigError, ["std", "inf"]),
    (dict(kind="gaussian", mean=math.nan), ConfigError, ["mean", "nan"]),
    (dict(kind="gaussian", strength=None), ConfigError, ["strength", "None"]),
    (dict(layer=1.0), ConfigError, ["layer", "1.0"]),
    (dict(layer="11"), ConfigError, ["layer", "'11'"]),
    (dict(layer=True), ConfigError, ["layer", "True"]),
    (dict(layer=None), ConfigError, ["layer", "None"]),
    (dict(kind="salt_and_pepper", low=1.0, high=0.0), ConfigError, ["low", "high", "1.0", "0.0"]),
    (dict(kind="salt_and_pepper", low=math.nan), ConfigError, ["low", "nan"]),
    (dict(kind="shift", matrix=torch.zeros(3, 3)), ConfigError, ["matrix", "dense", "'shift'"]),
    (dict(kind="gaussian", matrix=torch.zeros(3, 3)), ConfigError, ["matrix", "dense", "'gaussian'"]),
    (dict(kind="dense"), ConfigError, ["dense", "matrix"]),
    (dict(kind="gaussian", straight_through=True), ConfigError, ["straight_through", "'gaussian'"]),
    (dict(kind="salt_and_pepper", straight_through=True), ConfigError, ["straight_through", "'salt_and_pepper'"]),
    (dict(train=1), ConfigError, ["train", "bool", "1"]),
    (dict(eval="yes"), ConfigError, ["eval", "bool", "'yes'"]),
    (dict(check_matrix=None), ConfigError, ["check_matrix", "bool"]),
    (dict(kind="gaussian", seed=1.5), ConfigError, ["seed", "1.5"]),
    (dict(kind="gaussian", seed=True), ConfigError, ["seed", "True"]),
    (dict(kind="dense", matrix=torch.zeros(2, 3)), QualityMatrixError, ["not square", "(2, 3)"]),
    (dict(kind="dense", matrix=torch.tensor([[0.0, 2.0], [0.0, 0.0]])), QualityMatrixError, ["dominance"]),
    (dict(kind="dense", matrix=torch.tensor([[0.0, 1.0], [1.0, 0.0]])), QualityMatrixError, ["not invertible"]),
    (dict(kind="dense", matrix=torch.tensor([[0.0, math.nan], [0.0, 0.0]])), QualityMatrixError, ["non-finite"]),
    (dict(kind="shift", alpha=0.6), QualityMatrixError, ["dominance", "0.6"]),
    (dict(kind="shift", alpha=1.0), QualityMatrixError, ["dominance"]),
]


@pytest.mark.parametrize("kwargs,exc,needles", INVALID, ids=[repr(c[0])[:60] for c in INVALID])
def test_invalid_fields(kwargs, exc, needles):
    with pytest.raises(exc) as ei:
        NoiseConfig(**kwargs)
    assert isinstance(ei.value, NoisyNNError)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("alpha", (0.51, 0.6, 0.9, 1.0))
def test_shift_dominance_override(alpha):
    with pytest.raises(QualityMatrixError, match="dominance"):
        NoiseConfig(kind="shift", alpha=alpha)
    c = NoiseConfig(kind="shift", alpha=alpha, check_matrix=False)
    assert c.alpha == alpha


def test_dense_dominance_override():
    q = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    with pytest.raises(QualityMatrixError):
        NoiseConfig(kind="dense", matrix=q)
    c = NoiseConfig(kind="dense", matrix=q, check_matrix=False)
    assert torch.equal(c.matrix, q)


def test_dense_matrix_from_list():
    c = NoiseConfig(kind="dense", matrix=[[0.0, 0.1], [0.1, 0.0]])
    assert isinstance(c.matrix, torch.Tensor)
    assert torch.equal(c.matrix, torch.tensor([[0.0, 0.1], [0.1, 0.0]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# Batch-dependence guard
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,extra", [("optimal", {}), ("shift", {}), ("dense", {"matrix": small_q(3)})])
def test_batch_axis_at_eval_needs_opt_in(kind, extra):
    with pytest.raises(BatchDependenceError) as ei:
        NoiseConfig(kind=kind, axis="batch", **extra)
    msg = str(ei.value)
    assert "depend" in msg and "other samples" in msg and "batch" in msg
    assert "allow_batch_dependence" in msg and "eval=False" in msg
    assert isinstance(ei.value, NoisyNNError)
    # explicit opt-in, or mixing only in training
    c = NoiseConfig(kind=kind, axis="batch", allow_batch_dependence=True, **extra)
    assert c.mixes_batch and c.eval
    c = NoiseConfig(kind=kind, axis="batch", eval=False, **extra)
    assert c.mixes_batch and not c.eval


def test_batch_guard_explicit_eval_true():
    with pytest.raises(BatchDependenceError):
        NoiseConfig(axis="batch", eval=True, train=False)


@pytest.mark.parametrize("kind", ("identity", "gaussian", "salt_and_pepper"))
def test_batch_axis_without_mixing_is_fine(kind):
    c = NoiseConfig(kind=kind, axis="batch")
    assert not c.mixes_batch


@pytest.mark.parametrize("axis", ("tokens", "rows"))
def test_sample_local_axes_need_no_opt_in(axis):
    assert not NoiseConfig(kind="optimal", axis=axis).mixes_batch


def test_official_vit():
    with pytest.raises(BatchDependenceError, match="other samples"):
        NoiseConfig.official_vit()
    c = NoiseConfig.official_vit(allow_batch_dependence=True)
    assert (c.kind, c.axis, c.position, c.layer, c.train, c.eval) == ("optimal", "batch", "attn_input", -1, False, True)
    assert c.allow_batch_dependence
    assert not c.active(True) and c.active(False)
    # overrides pass through
    c = NoiseConfig.official_vit(axis="tokens")
    assert c.axis == "tokens" and not c.mixes_batch


@pytest.mark.parametrize("bad", (0, 2, -2, 1.0, True, "1", None))
def test_shift_direction_must_be_plus_or_minus_one(bad):
    with pytest.raises(ConfigError, match="shift must be"):
        NoiseConfig(kind="shift", shift=bad)


def test_shift_direction_default_and_round_trip():
    c = NoiseConfig(kind="shift")
    assert c.shift == 1
    c = NoiseConfig(kind="shift", shift=-1)
    assert c.to_dict()["shift"] == -1 and NoiseConfig.coerce(c.to_dict()) == c
    assert c != NoiseConfig(kind="shift")


def test_official_vit_salt_and_pepper():
    with pytest.raises(BatchDependenceError):
        NoiseConfig.official_vit_salt_and_pepper()
    c = NoiseConfig.official_vit_salt_and_pepper(0.3, allow_batch_dependence=True)
    assert (c.kind, c.p, c.value_range, c.position, c.layer, c.train, c.eval) == (
        "salt_and_pepper", 0.3, "batch", "attn_input", -1, False, True)
    assert NoiseConfig.official_vit_salt_and_pepper(eval=False).batch_dependent


def test_official_cnn():
    with pytest.raises(BatchDependenceError):
        NoiseConfig.official_cnn()
    c = NoiseConfig.official_cnn(allow_batch_dependence=True)
    assert (c.kind, c.alpha, c.shift, c.straight_through, c.axis, c.position, c.layer, c.train, c.eval) == (
        "shift", 0.4, -1, True, "batch", "block_input", -1, True, True)
    c = NoiseConfig.official_cnn(eval=False)
    assert c.active(True) and not c.active(False)


# ------------------------------------------------------------------------------------------------
# active / properties
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", (True, False))
@pytest.mark.parametrize("eval_", (True, False))
def test_active(train, eval_):
    c = NoiseConfig(train=train, eval=eval_)
    assert c.active(True) is train
    assert c.active(False) is eval_


@pytest.mark.parametrize("kind", KINDS)
def test_is_linear_is_random(kind):
    extra = {"matrix": small_q()} if kind == "dense" else {}
    c = NoiseConfig(kind=kind, **extra)
    assert c.is_linear == (kind in quality.LINEAR_KINDS)
    assert c.is_random == (kind in RANDOM_KINDS)
    assert c.is_linear != c.is_random


# ------------------------------------------------------------------------------------------------
# coerce / equality / replace / to_dict
# ------------------------------------------------------------------------------------------------
def test_coerce():
    assert NoiseConfig.coerce(None) is None
    c = NoiseConfig(kind="shift", alpha=0.2)
    assert NoiseConfig.coerce(c) is c
    assert NoiseConfig.coerce("shift") == NoiseConfig(kind="shift")
    assert NoiseConfig.coerce("gaussian").kind == "gaussian"
    d = NoiseConfig.coerce({"kind": "shift", "alpha": 0.2, "axis": "rows"})
    assert d == NoiseConfig(kind="shift", alpha=0.2, axis="rows")
    assert NoiseConfig.coerce({}) == NoiseConfig()


def test_coerce_errors():
    with pytest.raises(ConfigError, match="bogus") as ei:
        NoiseConfig.coerce({"kind": "shift", "bogus": 1, "alpah": 0.2})
    assert "alpah" in str(ei.value)
    with pytest.raises(ConfigError, match="'nope'"):
        NoiseConfig.coerce("nope")
    with pytest.raises(ConfigError, match="int"):
        NoiseConfig.coerce(3)
    with pytest.raises(ConfigError, match="list"):
        NoiseConfig.coerce(["shift"])
    # dict values are validated too
    with pytest.raises(ConfigError, match="alpha"):
        NoiseConfig.coerce({"kind": "shift", "alpha": 2.0})
    with pytest.raises(BatchDependenceError):
        NoiseConfig.coerce({"axis": "batch"})


def test_equality():
    assert NoiseConfig() == NoiseConfig()
    assert NoiseConfig(kind="shift", alpha=0.2) == NoiseConfig(kind="shift", alpha=0.2)
    assert NoiseConfig(kind="shift", alpha=0.2) != NoiseConfig(kind="shift", alpha=0.3)
    assert NoiseConfig(layer=1) != NoiseConfig(layer=2)
    assert NoiseConfig(kind="gaussian", seed=1) != NoiseConfig(kind="gaussian", seed=None)
    assert NoiseConfig() != "optimal"
    assert NoiseConfig() != None  # noqa: E711


def test_equality_dense_matrix():
    q = small_q(3)
    a = NoiseConfig(kind="dense", matrix=q)
    b = NoiseConfig(kind="dense", matrix=q.clone())
    assert a == b
    q2 = q.clone()
    q2[0, 1] += 0.01
    assert a != NoiseConfig(kind="dense", matrix=q2)
    assert a != NoiseConfig(kind="dense", matrix=small_q(4))  # other size
    assert a != NoiseConfig(kind="optimal")


def test_not_hashable():
    with pytest.raises(TypeError):
        hash(NoiseConfig())


def test_replace_revalidates():
    c = NoiseConfig(kind="shift", alpha=0.2)
    r = c.replace(alpha=0.4)
    assert r.alpha == 0.4 and c.alpha == 0.2  # a copy
    assert r == NoiseConfig(kind="shift", alpha=0.4)
    with pytest.raises(ConfigError, match="alpha"):
        c.replace(alpha=3.0)
    with pytest.raises(QualityMatrixError, match="dominance"):
        c.replace(alpha=0.8)
    with pytest.raises(BatchDependenceError):
        c.replace(axis="batch")
    assert c.replace(axis="batch", eval=False).axis == "batch"
    with pytest.raises(ConfigError, match="kind"):
        c.replace(kind="bad")
    d = NoiseConfig(kind="dense", matrix=small_q(3))
    with pytest.raises(ConfigError, match="matrix"):
        d.replace(kind="optimal")  # matrix left behind for a non-dense kind
    with pytest.raises(ConfigError, match="straight_through"):
        NoiseConfig(kind="shift", straight_through=True).replace(kind="gaussian")


def test_to_dict():
    c = NoiseConfig(kind="shift", alpha=0.2, layer=3, position="attn_input", seed=None)
    d = c.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(NoiseConfig)}
    assert d["kind"] == "shift" and d["alpha"] == 0.2 and d["layer"] == 3 and d["position"] == "attn_input"
    assert d["matrix"] is None
    json.dumps(d)  # plain JSON-able values
    assert NoiseConfig.coerce(d) == c  # round trip


def test_to_dict_dense():
    q = small_q(3)
    c = NoiseConfig(kind="dense", matrix=q)
    d = c.to_dict()
    assert isinstance(d["matrix"], list) and d["matrix"] == q.tolist()
    json.loads(json.dumps(d))
    assert NoiseConfig.coerce(d) == c
    assert isinstance(c.matrix, torch.Tensor)  # to_dict did not change the config


# ------------------------------------------------------------------------------------------------
# NoiseInjection
# ------------------------------------------------------------------------------------------------
def _optimal_tokens(x, prefix):
    """Optimal Q along tokens as a dense product, written out."""
    k = x.shape[1] - prefix
    M = (torch.eye(k, dtype=torch.float64) + torch.ones(k, k, dtype=torch.float64)) / (k + 1)
    body = torch.einsum("ij,bjd->bid", M, x[:, prefix:].double()).to(x.dtype)
    return torch.cat([x[:, :prefix], body], dim=1)


MODE_KINDS = [
    dict(kind="optimal"), dict(kind="shift", alpha=0.3), dict(kind="dense", matrix=small_q(8)),
    dict(kind="gaussian", seed=0), dict(kind="salt_and_pepper", p=0.5, seed=0),
    dict(kind="optimal", axis="batch", allow_batch_dependence=True),
]


@pytest.mark.parametrize("kw", MODE_KINDS, ids=lambda d: d["kind"] + "-" + d.get("axis", "tokens"))
@pytest.mark.parametrize("train", (True, False))
@pytest.mark.parametrize("eval_", (True, False))
def test_injection_active_in_configured_modes(kw, train, eval_):
    m = NoiseInjection(NoiseConfig(train=train, eval=eval_, **kw), prefix_tokens=1)
    x = torch.randn(3, 1 + 8, 5, generator=_gen(1))
    for training, on in ((True, train), (False, eval_)):
        m.train(training)
        out = m(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        if on:
            assert not torch.equal(out, x), (training, "noise should be on")
            assert torch.equal(out[:, :1], x[:, :1])  # class token untouched
        else:
            assert torch.equal(out, x), (training, "noise should be off")


def test_injection_output_value():
    m = NoiseInjection({"kind": "optimal", "axis": "tokens"}, prefix_tokens=1)
    x = torch.randn(2, 1 + 9, 4, dtype=torch.float64, generator=_gen(2))
    torch.testing.assert_close(m(x), _optimal_tokens(x, 1), rtol=1e-12, atol=1e-12)
    m.eval()
    torch.testing.assert_close(m(x), _optimal_tokens(x, 1), rtol=1e-12, atol=1e-12)


def test_injection_rows_with_grid():
    m = NoiseInjection({"kind": "shift", "axis": "rows", "alpha": 0.25}, prefix_tokens=1, grid=(2, 3))
    x = torch.randn(2, 1 + 6, 4, dtype=torch.float64, generator=_gen(3))
    out = m(x)
    body = x[:, 1:].reshape(2, 2, 3, 4)
    exp = 0.75 * body + 0.25 * body.flip(1)  # k = 2 rows: row i mixes with row i-1 mod 2 = the other row
    torch.testing.assert_close(out[:, 1:], exp.reshape(2, 6, 4), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, :1], x[:, :1])


def test_injection_feature_map_ignores_prefix():
    m = NoiseInjection("optimal", prefix_tokens=1)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=_gen(4))
    out = m(x)
    flat = x.reshape(2, 3, 16)
    exp = ((flat + flat.sum(-1, keepdim=True)) / 17).reshape(2, 3, 4, 4)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)


def test_injection_dense_wrong_size_raises():
    m = NoiseInjection({"kind": "dense", "matrix": small_q(4)})
    with pytest.raises(QualityMatrixError, match=r"\(4, 4\)"):
        m(torch.randn(2, 5, 3))
    out = m(torch.randn(2, 4, 3))
    assert out.shape == (2, 4, 3)


@pytest.mark.parametrize("kw", [dict(kind="gaussian", seed=123), dict(kind="salt_and_pepper", p=0.3, seed=123)],
                         ids=("gaussian", "salt_and_pepper"))
def test_injection_seeded_reproducible(kw):
    x = torch.randn(2, 1 + 16, 8, generator=_gen(5))
    m = NoiseInjection(kw, prefix_tokens=1)
    a = m(x)
    b = m(x)
    assert not torch.equal(a, b)  # the generator advances
    m.reset_generator()
    assert torch.equal(m(x), a)
    assert torch.equal(m(x), b)
    # another module with the same seed gives the same sequence, a different seed another one
    assert torch.equal(NoiseInjection(kw, prefix_tokens=1)(x), a)
    other = dict(kw, seed=124)
    assert not torch.equal(NoiseInjection(other, prefix_tokens=1)(x), a)
    # seeding does not touch the global RNG
    torch.manual_seed(0)
    ref = torch.rand(3)
    torch.manual_seed(0)
    m.reset_generator()
    m(x)
    assert torch.equal(torch.rand(3), ref)


def test_injection_unseeded_uses_global_rng():
    x = torch.randn(2, 9, 4, generator=_gen(6))
    m = NoiseInjection({"kind": "gaussian"})
    torch.manual_seed(11)
    a = m(x)
    torch.manual_seed(11)
    assert torch.equal(m(x), a)


@pytest.mark.parametrize("kw", [
    dict(kind="optimal"), dict(kind="shift"), dict(kind="identity"), dict(kind="dense", matrix=small_q(5)),
    dict(kind="gaussian", seed=3), dict(kind="salt_and_pepper", seed=3),
], ids=lambda d: d["kind"])
def test_injection_has_no_state(kw):
    m = NoiseInjection(kw)
    assert dict(m.state_dict()) == {}
    assert list(m.parameters()) == []
    base = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    keys = set(base.state_dict())
    with_noise = nn.Sequential(base[0], NoiseInjection(kw), base[1])
    assert {k.split(".", 1)[1] for k in with_noise.state_dict()} == {k.split(".", 1)[1] for k in keys}
    assert len(with_noise.state_dict()) == len(keys)
    # a checkpoint of the model without noise loads strictly into the model with noise
    plain = nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.LayerNorm(4))
    with_noise.load_state_dict(plain.state_dict(), strict=True)


def test_injection_dense_matrix_is_a_buffer_that_follows_the_module():
    q = small_q(5)
    m = NoiseInjection({"kind": "dense", "matrix": q})
    assert "quality_matrix" in dict(m.named_buffers())
    assert torch.equal(m.quality_matrix, q)
    m.float()
    assert m.quality_matrix.dtype == torch.float32


def test_injection_coerces_and_rejects_none():
    assert NoiseInjection("shift").config == NoiseConfig(kind="shift")
    assert NoiseInjection({"kind": "gaussian", "std": 2.0}).config.std == 2.0
    c = NoiseConfig(kind="identity")
    assert NoiseInjection(c).config is c
    with pytest.raises(TypeError):
        NoiseInjection(None)
    with pytest.raises(ConfigError):
        NoiseInjection({"kind": "shift", "nope": 1})
    with pytest.raises(BatchDependenceError):
        NoiseInjection({"axis": "batch"})


def test_injection_straight_through():
    m = NoiseInjection({"kind": "optimal", "straight_through": True}, prefix_tokens=1)
    x = torch.randn(2, 1 + 6, 3, dtype=torch.float64, generator=_gen(7), requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y.detach(), _optimal_tokens(x.detach(), 1), rtol=1e-12, atol=1e-12)
    g = torch.randn(y.shape, dtype=torch.float64, generator=_gen(8))
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_injection_batch_axis_official_protocol():
    m = NoiseInjection(NoiseConfig.official_vit(allow_batch_dependence=True), prefix_tokens=1)
    x = torch.randn(4, 1 + 4, 3, dtype=torch.float64, generator=_gen(9))
    m.train()
    assert torch.equal(m(x), x)  # official ViT: no noise in training
    m.eval()
    out = m(x)
    s = x[:, 1:].sum(0, keepdim=True)
    torch.testing.assert_close(out[:, 1:], (x[:, 1:] + s) / 5, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, :1], x[:, :1])
    # batch of one: identity
    torch.testing.assert_close(m(x[:1]), x[:1], rtol=0, atol=1e-15)


def test_extra_repr():
    r = repr(NoiseInjection({"kind": "shift", "alpha": 0.25, "axis": "rows"}, prefix_tokens=1))
    assert "kind=shift" in r and "axis=rows" in r and "alpha=0.25" in r and "prefix_tokens=1" in r


def test_dense_nan_matrix_rejected_even_with_check_matrix_false():
    # The override relaxes the paper's conditions (invertible, dominance), never finiteness.
    bad = torch.eye(3, dtype=torch.float64)
    bad[1, 2] = float("nan")
    with pytest.raises(QualityMatrixError, match="non-finite"):
        NoiseConfig(kind="dense", matrix=bad, check_matrix=False)
    NoiseConfig(kind="dense", matrix=torch.full((3, 3), 5.0, dtype=torch.float64), check_matrix=False)


def test_salt_and_pepper_value_range_and_its_batch_dependence():
    assert NoiseConfig(kind="salt_and_pepper").value_range == "sample"
    assert not NoiseConfig(kind="salt_and_pepper").batch_dependent
    with pytest.raises(BatchDependenceError, match="value_range='batch'"):
        NoiseConfig(kind="salt_and_pepper", value_range="batch")
    ok = NoiseConfig(kind="salt_and_pepper", value_range="batch", allow_batch_dependence=True)
    assert ok.batch_dependent and not ok.mixes_batch
    assert NoiseConfig(kind="salt_and_pepper", value_range="batch", eval=False).batch_dependent
    # both values given: nothing is taken from the batch
    fixed = NoiseConfig(kind="salt_and_pepper", value_range="batch", low=0.0, high=1.0)
    assert not fixed.batch_dependent
    with pytest.raises(ConfigError, match="value_range must be one of"):
        NoiseConfig(kind="salt_and_pepper", value_range="global")
    assert NoiseConfig(kind="optimal", axis="batch", allow_batch_dependence=True).batch_dependent
