"""noisynn_kernels.mix_add_layernorm (fused residual add + (I + Q) mix + LayerNorm) on every backend vs the oracle
:func:`noisynn_kernels.reference.mix_add_layernorm`.

The backends (the ``backend`` fixture, tests/_backends.py): ``reference`` (PyTorch ops), ``cpu`` (the C++
kernels of ``noisynn::mix_add_layernorm_fwd_cpp``), ``cuda`` (its CUDA kernels; needs a GPU) and ``triton``
(``noisynn::mix_add_layernorm_fwd``; on a GPU, or on the CPU in Triton's interpreter, which has no bf16).  A
test runs on every backend that has what it tests; one that cannot run here is skipped with the reason.
Backend-specific tests (the C++ kernels' threads, work buffers and instruction sets, the CUDA kernels' vector
paths, the Triton interpreter's limits) are here too, parametrized with their backend only.

Tolerance: the oracle's rule (tests/_oracle.py), for the outputs and every gradient.
"""

import importlib
import itertools
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from _backends import backend_param, backends
from _oracle import ALPHA, ATOL, AXES, KINDS, Oracle, check, dense_q, gen, make_config, mixed_k

import noisynn_kernels as nk
from noisynn_kernels import NoiseConfig, quality, reference
from noisynn_kernels._op_codes import AXIS_CODES, KIND_CODES
from noisynn_kernels.errors import BackendUnavailableError, ConfigError, QualityMatrixError, ShapeError

#: Every backend of the op.
ALL = ("reference", "cpu", "cuda", "triton")
#: The backends with a registered op (kernels).
KERNELS = ("cpu", "cuda", "triton")
#: The C++ op's implementations.
CPP = ("cpu", "cuda")
#: The backends' ops: (forward, backward) in ``torch.ops.noisynn``.
OPS = {"cpu": ("mix_add_layernorm_fwd_cpp", "mix_add_layernorm_bwd_cpp"),
       "cuda": ("mix_add_layernorm_fwd_cpp", "mix_add_layernorm_bwd_cpp"),
       "triton": ("mix_add_layernorm_fwd", "mix_add_layernorm_bwd")}
#: Where the references run when not on the backend's device: Triton's are on the CPU (fp16 included), also
#: when the kernels run on a GPU.
REFERENCE_DEVICE = {"triton": "cpu"}
MIXING = ("shift", "optimal", "dense")


@pytest.fixture
def oracle(backend):
    return Oracle(backend.name, backend.device, REFERENCE_DEVICE.get(backend.name))


def _ops(name):
    """``(fwd, bwd)``, the op packets of backend ``name`` (importing the Triton ops registers them)."""
    if name == "triton":
        importlib.import_module("noisynn_kernels.ops.mix_add_layernorm.triton")
    return tuple(getattr(torch.ops.noisynn, op) for op in OPS[name])


# --------------------------------------------------------------------------------------------------
# kernel vs reference

_FLAGS = list(itertools.product((True, False), repeat=3))


def _full(dtypes):
    """kinds x axes x order x prefix 0/1/5 x D 123/192 in each dtype; B 2/3, the eight residual / weight / bias
    combinations and non-contiguous inputs rotate through them.  D = 123 runs the CUDA kernels' scalar path,
    D = 192 their 16-byte vector path."""
    for i, (dtype, kind, axis, man, prefix, D) in enumerate(itertools.product(
            dtypes, KINDS, AXES, (False, True), (0, 1, 5), (123, 192))):
        yield (2 + (i // 2) % 2, prefix, D, kind, axis, man, dtype, *_FLAGS[(i * 3 + i // 8) % 8], i % 4 == 1)


def _rotated(dtypes):
    """kinds x axes x order in each dtype; prefix 0/1/5, D 123/192, B 2/3, the eight residual / weight / bias
    combinations and non-contiguous inputs rotate through them (Triton's interpreter is slow)."""
    for i, (dtype, kind, axis, man) in enumerate(itertools.product(dtypes, KINDS, AXES, (False, True))):
        yield (2 + (i // 2) % 2, (0, 1, 5)[i % 3], (123, 192)[(i // 3) % 2], kind, axis, man, dtype,
               *_FLAGS[(i * 3) % 8], i % 4 == 1)


#: The main cases of each backend: every kind x axis x order in every dtype it has, the full product for the
#: compiled kernels, the rotation for the others.  The C++ CPU kernels also take fp16 (on the tokens axis);
#: the Triton kernels take bf16 on a GPU (non-contiguous inputs, all three of residual / weight / bias).
MAIN_CASES = {
    "reference": list(_rotated((torch.float32, torch.float16, torch.bfloat16))),
    "cpu": list(_full((torch.float32, torch.bfloat16)))
    + [(2, 1, 123, kind, "tokens", man, torch.float16, True, True, True, False)
       for kind in MIXING for man in (False, True)],
    "cuda": list(_full((torch.float32, torch.float16, torch.bfloat16))),
    "triton": list(_rotated((torch.float32, torch.float16)))
    + [(3, 1, 192, kind, axis, man, torch.bfloat16, True, True, True, True)
       for kind in KINDS for axis in AXES for man in (False, True)],
}


def _case_id(B, prefix, D, kind, axis, man, dtype, has_res, has_w, has_b, noncontig):
    return (f"{str(dtype)[6:]}-{kind}-{axis}-{'after' if man else 'before'}-P{prefix}-D{D}-B{B}-"
            f"{'r' if has_res else ''}{'w' if has_w else ''}{'b' if has_b else ''}{'-noncontig' if noncontig else ''}")


@pytest.mark.parametrize("backend,B,prefix,D,kind,axis,mix_after_norm,dtype,has_res,has_w,has_b,noncontig",
                         [backend_param(name, *case, id=_case_id(*case))
                          for name, cases in MAIN_CASES.items() for case in cases], indirect=["backend"])
def test_matches_reference(backend, oracle, B, prefix, D, kind, axis, mix_after_norm, dtype, has_res, has_w, has_b,
                           noncontig):
    backend.skip_unless(dtype)
    oracle.run_case(B, prefix + 16, D, prefix, kind, axis, mix_after_norm, dtype, has_res=has_res, has_w=has_w,
                    has_b=has_b, noncontig=noncontig)


@backends(*ALL)
@pytest.mark.parametrize("kind", MIXING)
@pytest.mark.parametrize("grid", ((2, 8), (8, 2)))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_non_square_grid(oracle, kind, grid, mix_after_norm):
    oracle.run_case(2, 1 + 16, 123, 1, kind, "rows", mix_after_norm, torch.float32, grid=grid)


@backends(*ALL)
@pytest.mark.parametrize("kind", MIXING)
@pytest.mark.parametrize("axis,B,N,prefix,grid", [("tokens", 2, 8, 1, None), ("rows", 2, 22, 1, (7, 3)),
                                                  ("batch", 7, 3, 1, None), ("batch", 1, 6, 1, None),
                                                  ("tokens", 2, 2, 1, None)])
def test_odd_sizes(oracle, kind, axis, B, N, prefix, grid):
    """k = 7 on every axis (odd, not a power of two), and k = 1 (batch of one, one patch token: the identity)."""
    for man in (False, True):
        oracle.run_case(B, N, 123, prefix, kind, axis, man, torch.float32, grid=grid)


@backends(*ALL)
@pytest.mark.parametrize("D", (384, 768, 1024))
@pytest.mark.parametrize("kind", ("shift", "optimal"))
def test_model_widths(oracle, D, kind):
    oracle.run_case(2, 1 + 4, D, 1, kind, "rows", kind == "optimal", torch.float32)


@backends("cuda")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mix_after_norm", (False, True))
@pytest.mark.parametrize("D", (768, 4104, 8192))
def test_wide_rows(oracle, D, mix_after_norm, kind, dtype):
    """Several vectors per thread and 512-thread rows; D = 8192 needs more than 48 KiB of shared memory in
    the CUDA backward (opt-in)."""
    oracle.run_case(2, 1 + 9, D, 1, kind, "tokens", mix_after_norm, dtype)


@backends(*CPP)
@pytest.mark.parametrize("kind", ("identity", "shift", "optimal"))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_many_rows(oracle, kind, mix_after_norm):
    """More rows than resident blocks: on CUDA every backward block loops over a range of rows (dweight
    partials); on the CPU many rows per thread."""
    oracle.run_case(64, 1 + 196, 192, 1, kind, "rows", mix_after_norm, torch.bfloat16)


@backends(*KERNELS)
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_optimal_long_group(oracle, mix_after_norm):
    """A long tokens group: the C++ group buffer is too small for it (K * D > 2**21 floats), so the column sum
    pass and the row pass each recompute the source rows; on CUDA the column sum splits the group's rows over
    the block's slices; Triton's column sum adds fixed slices of the group's rows, then the slices' partials
    in a fixed order (one running fp32 sum over the 1040 rows misses the tolerance of dweight)."""
    oracle.run_case(1, 2 + 1040, 2048, 2, "optimal", "tokens", mix_after_norm, torch.float32, has_w=True)


@backends(*KERNELS)
@pytest.mark.parametrize("kind,mix_after_norm", [("identity", False), ("shift", False), ("optimal", False),
                                                 ("dense", False), ("optimal", True)])
@pytest.mark.parametrize("D", (7, 64, 1024))
def test_row_statistics_as_accurate_as_torch_layernorm(backend, kind, mix_after_norm, D):
    """The LayerNorm statistics of every row (the op's ``rstd`` output, of the rows of ``residual_out``)
    within 4x the error of torch's own fp32 LayerNorm of the same rows, against fp64, on rows built to
    break a one-pass variance: a large offset, and outliers among the first 8 values (the CPU kernels take
    mean and variance in one pass about the mean of those 8 and need a second pass where it lies far from
    the row's mean: without it, rows with 8 equal outliers up front at D = 1024 lose about 100x)."""
    fwd, _ = _ops(backend.name)
    g = torch.Generator().manual_seed(11)
    B, N = 2, 1 + 16
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64) * 3 + 50
    x[0, 1::3, : min(D, 8)] = 1e4                   # 8 equal outliers up front
    x[0, 2::3, 0] = -3e3                            # one
    x[1, 1::2, 3 % D] = 2e3                         # one, not first
    x[1, 2::4] = x[1, 2::4] * 1e-3 + 7.5            # a large offset against a small spread
    x = x.float().to(backend.device)
    cfg = make_config(kind, "tokens", N - 1)
    spec = nk._validate.check_mix_add_layernorm(x, None, None, None, 1e-6, cfg, 1, None, mix_after_norm)
    from noisynn_kernels.ops.common import mix_args

    with torch.no_grad():
        _, rows, _, rstd = fwd(x, None, None, None, 1e-6, *mix_args(spec, x.device), mix_after_norm, False)
    rows = rows.reshape(-1, D).cpu()
    exact = 1 / (rows.double().var(-1, unbiased=False) + 1e-6).sqrt()
    _, _, torch_rstd = torch.native_layer_norm(rows, (D,), None, None, 1e-6)
    err = ((rstd.cpu().double().reshape(-1) - exact) / exact).abs()
    err_torch = ((torch_rstd.double().reshape(-1) - exact) / exact).abs()
    bound = 4 * err_torch.max().item() + 2 ** -24
    assert err.max().item() <= bound, (err.max().item(), err_torch.max().item())


@backends(*ALL)
@pytest.mark.parametrize("kind", MIXING)
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_straight_through(oracle, kind, mix_after_norm):
    """Forward M x, gradient the identity (the reference's x + (Mx - x).detach())."""
    oracle.run_case(2, 1 + 16, 123, 1, kind, "tokens", mix_after_norm, torch.float32, straight_through=True)


@backends(*ALL)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("mix_after_norm", (False, True))
@pytest.mark.parametrize("straight_through", (False, True))
def test_shift_direction(oracle, axis, mix_after_norm, straight_through):
    """``shift=-1`` (row ``i`` reads row ``i + 1``, the official CNN code's direction): outputs and gradients
    against the reference, on every axis, in both orders, with and without straight-through."""
    oracle.run_case(3, 1 + 16, 123, 1, "shift", axis, mix_after_norm, torch.float32, shift=-1,
                    straight_through=straight_through)


@backends(*ALL)
@pytest.mark.parametrize("shift", (1, -1))
def test_shift_direction_formula(backend, shift):
    """Stated as a formula, independently of the reference: on the batch axis sample ``b`` of ``residual_out``
    is ``(1 - a) x_b + a x_{(b - shift) mod B}`` (``shift=-1``: ``x_{b+1}``, the official ``cat(x[1:], x[:1])``),
    prefix tokens unmixed; with ``straight_through`` the gradient wrt ``x`` is the upstream gradient itself."""
    B, N, D, a = 4, 1 + 6, 40, 0.4
    x = torch.randn(B, N, D, generator=gen(21)).to(backend.device).requires_grad_()
    for st in (False, True):
        cfg = NoiseConfig(kind="shift", alpha=a, shift=shift, axis="batch", straight_through=st,
                          allow_batch_dependence=True)
        _, res_out = nk.mix_add_layernorm(x, None, None, None, mix=cfg, prefix_tokens=1, backend=backend.name)
        xd = x.detach()
        partner = torch.stack([xd[(b - shift) % B] for b in range(B)])
        expected = torch.cat([xd[:, :1], (1 - a) * xd[:, 1:] + a * partner[:, 1:]], dim=1)
        torch.testing.assert_close(res_out, expected, rtol=1e-5, atol=1e-5)
        g = torch.randn(B, N, D, generator=gen(22)).to(backend.device)
        (dx,) = torch.autograd.grad((res_out * g).sum(), x)
        if st:
            torch.testing.assert_close(dx, g, rtol=0, atol=0)
        else:  # M^T g: sample b collects its own share and the share it gave to the sample that read it
            back = torch.stack([g[(b + shift) % B] for b in range(B)])
            exp_dx = torch.cat([g[:, :1], (1 - a) * g[:, 1:] + a * back[:, 1:]], dim=1)
            torch.testing.assert_close(dx, exp_dx, rtol=1e-5, atol=1e-5)


@backends(*ALL)
@pytest.mark.parametrize("use", (("normed",), ("residual_out",)))
@pytest.mark.parametrize("kind,mix_after_norm", (("optimal", False), ("shift", True)))
def test_one_output_used(oracle, use, kind, mix_after_norm):
    """Only one output reaches the loss: the other's gradient is absent (None or zeros) in backward."""
    oracle.run_case(2, 1 + 16, 123, 1, kind, "tokens", mix_after_norm, torch.float32, use=use)


@backends(*ALL)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_misaligned_inputs(backend, oracle, dtype):
    """Rows of a vector-friendly D at an address that is not 16-byte aligned (a storage offset): the CUDA
    kernels take their scalar path."""
    backend.skip_unless(dtype)
    B, N, D = 2, 17, 192
    flat = torch.randn(B * N * D + 1, generator=gen(3)).to(device=backend.device, dtype=dtype)
    x = flat[1:].view(B, N, D)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    cfg = make_config("shift", "tokens", N - 1)
    outs = oracle.fused(x, None, None, None, mix=cfg, prefix_tokens=1)
    x = x.to(oracle.reference_device)
    t64, ts = ({"x": x.to(dt), "residual": None, "weight": None, "bias": None} for dt in (torch.float64, dtype))
    ref64 = Oracle.reference_call(t64, cfg=cfg, prefix=1, grid=None, mix_after_norm=False)
    refs = Oracle.reference_call(ts, cfg=cfg, prefix=1, grid=None, mix_after_norm=False)
    for name, o, r64, rs in zip(("normed", "residual_out"), outs, ref64, refs):
        check(o.to(r64.device), r64, rs, ATOL[dtype], name)


@backends(*ALL)
def test_no_mix_is_residual_layernorm(oracle):
    """mix=None: plain fused residual add + LayerNorm; equal to torch's layer_norm."""
    vals, leaves = oracle.make_inputs(2, 9, 123, has_res=True, has_w=True, has_b=True)
    t = leaves(torch.float32)
    normed, res_out = oracle.fused(t["x"], t["residual"], t["weight"], t["bias"], 1e-5)
    s = t["x"] + t["residual"]
    torch.testing.assert_close(res_out, s)
    torch.testing.assert_close(normed, torch.nn.functional.layer_norm(s, (123,), t["weight"], t["bias"], 1e-5),
                               atol=1e-5, rtol=1e-5)


@backends(*ALL)
def test_prefix_tokens_are_added_and_normalized_but_not_mixed(oracle):
    vals, leaves = oracle.make_inputs(2, 5 + 16, 123, has_res=True, has_w=False, has_b=False)
    t = leaves(torch.float32)
    normed, res_out = oracle.fused(t["x"], t["residual"], mix=make_config("optimal", "tokens", 16), prefix_tokens=5)
    s = (t["x"] + t["residual"]).detach()
    torch.testing.assert_close(res_out[:, :5], s[:, :5])
    assert not torch.allclose(res_out[:, 5:], s[:, 5:])
    torch.testing.assert_close(normed[:, :5], reference.layer_norm(s[:, :5], None, None, 1e-6), atol=1e-5, rtol=1e-5)


@backends(*ALL)
def test_matches_reference_backend(backend):
    """The public op with ``backend=name`` gives the values of ``backend='reference'``."""
    x = torch.randn(2, 17, 64, generator=gen(8)).to(backend.device)
    cfg = NoiseConfig(kind="optimal", axis="tokens", allow_batch_dependence=True)
    ours = nk.mix_add_layernorm(x, None, None, None, mix=cfg, prefix_tokens=1, backend=backend.name)
    ref = nk.mix_add_layernorm(x.cpu(), None, None, None, mix=cfg, prefix_tokens=1, backend="reference")
    for o, r in zip(ours, ref):
        assert o.device.type == backend.device
        torch.testing.assert_close(o.cpu(), r, rtol=1e-5, atol=1e-5)


@backends(*ALL)
def test_parameter_gradients_keep_each_parameters_dtype(backend):
    """A bf16 weight with an fp32 bias: dweight in bf16, dbias in fp32 (not rounded to the weight's dtype),
    as the reference backend gives them."""
    x = torch.randn(2, 9, 32, generator=gen(9)).to(backend.device).requires_grad_()
    w = (1 + 0.5 * torch.randn(32, generator=gen(10))).bfloat16().to(backend.device).requires_grad_()
    b = torch.randn(32, generator=gen(11)).to(backend.device).requires_grad_()
    g = torch.randn(2, 9, 32, generator=gen(12)).to(backend.device)
    grads = {}
    for name in (backend.name, "reference"):
        normed, _ = nk.mix_add_layernorm(x, None, w, b, mix="optimal", prefix_tokens=1, backend=name)
        grads[name] = torch.autograd.grad((normed * g).sum(), (w, b))
    (dw, db), (rw, rb) = grads[backend.name], grads["reference"]
    assert dw.dtype == torch.bfloat16 and db.dtype == torch.float32
    torch.testing.assert_close(db, rb, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw.float(), rw.float(), rtol=2e-2, atol=2e-2)


@backends("reference")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("after", [False, True])
def test_reference_backend_is_the_definition(backend, kind, axis, after):
    """In fp64 the reference backend is :func:`noisynn_kernels.reference.mix_add_layernorm` called with the
    checked arguments (a non-square grid, given for every axis and used by ``rows`` only)."""
    g = gen(0)
    B, P, gh, gw, D = 3, 1, 2, 3, 7
    x, r = (torch.randn(B, P + gh * gw, D, generator=g, dtype=torch.float64) for _ in range(2))
    w, b = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    k = {"tokens": gh * gw, "rows": gh, "batch": B}[axis]
    q = 0.1 * torch.randn(k, k, generator=g, dtype=torch.float64) if kind == "dense" else None
    cfg = NoiseConfig(kind=kind, axis=axis, matrix=q, eval=False) if axis == "batch" else \
        NoiseConfig(kind=kind, axis=axis, matrix=q, check_matrix=kind != "dense")
    got = nk.mix_add_layernorm(x, r, w, b, 1e-5, mix=cfg, prefix_tokens=P, grid=(gh, gw), mix_after_norm=after,
                               backend="reference")
    M = quality.mixing_matrix("dense", k, matrix=q) if kind == "dense" else None
    exp = reference.mix_add_layernorm(x, r, w, b, 1e-5, kind=kind, axis=axis, alpha=cfg.alpha, M=M, prefix_tokens=P,
                                      grid=(gh, gw) if axis == "rows" else None, mix_after_norm=after)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# state, threads and determinism


@backends(*CPP)
@pytest.mark.parametrize("kind", MIXING)
@pytest.mark.parametrize("axis", ("tokens", "rows"))
def test_work_buffers_carry_nothing_between_calls(oracle, backend, kind, axis):
    """Each CPU thread keeps its work buffer between calls, uninitialised: a call after one on NaN inputs
    (which leaves NaN in every buffer) must give bitwise the result it gave before."""
    N, grid = 1 + 16, (4, 4)
    cfg = make_config(kind, axis, 16 if axis == "tokens" else 4)
    t = oracle.make_inputs(3, N, 40, has_res=True, has_w=True, has_b=True, seed=4)[0]
    args = tuple(t[n].to(backend.device) for n in ("x", "residual", "weight", "bias"))

    def call(x, r, w, b):
        with torch.no_grad():
            return oracle.fused(x, r, w, b, mix=cfg, prefix_tokens=1, grid=grid)

    before = call(*args)
    poisoned = call(torch.full((3, N, 40), float("nan"), device=backend.device), *args[1:])
    assert torch.isnan(poisoned[1]).all()
    after = call(*args)
    for one, two in zip(before, after):
        assert torch.equal(one, two)


@backends("cpu")
@pytest.mark.parametrize("kind", MIXING)
@pytest.mark.parametrize("grid", ((1, 8), (7, 3), (4, 5), (16, 3), (20, 5)))
@pytest.mark.parametrize("B", (2, 4))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_rows_bundles(oracle, kind, grid, B, mix_after_norm):
    """Axis rows mixes several grid columns per task: all of a sample's when that still gives 4 tasks
    per thread, else fewer.  With B = 4 one thread takes whole samples and two threads split them
    (a partial last bundle for 3 and 5 columns); with B = 2 one thread splits them and two threads go
    down to one or two columns per task.  Grid heights 1 (the identity), odd and even, 16 and 20 (dense
    through the BLAS, one product per grid column).  The oracle
    holds for every bundling, and each row's arithmetic does not depend on it: outputs and dx are
    bitwise the same for 1 and 2 threads."""
    N = 1 + grid[0] * grid[1]
    cfg = make_config(kind, "rows", grid[0])
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            oracle.run_case(B, N, 123, 1, kind, "rows", mix_after_norm, torch.float32, grid=grid)
            t = oracle.make_inputs(B, N, 123, has_res=True, has_w=True, has_b=True, seed=3)[1](torch.float32)
            normed, res = oracle.fused(t["x"], t["residual"], t["weight"], t["bias"], mix=cfg, prefix_tokens=1,
                                       grid=grid, mix_after_norm=mix_after_norm)
            (normed * torch.linspace(-1, 1, 123) + res).sum().backward()
            results.append((normed.detach(), res.detach(), t["x"].grad))
    finally:
        torch.set_num_threads(old)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@backends("cpu")
@pytest.mark.parametrize("axis,B,N,grid", [("tokens", 2, 1 + 15, None), ("tokens", 2, 1 + 16, None),
                                           ("tokens", 3, 1 + 40, None), ("rows", 2, 1 + 16 * 3, (16, 3)),
                                           ("rows", 2, 1 + 20 * 5, (20, 5)), ("batch", 20, 1 + 4, None)])
@pytest.mark.parametrize("mix_after_norm", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_dense_matrix_product(oracle, axis, B, N, grid, mix_after_norm, dtype):
    """Groups of 16 rows or more take the dense product through ATen's BLAS (one product per task: the
    kept source rows of a bundle of grid columns are one K x (columns * D) matrix); 15 stays in the
    kernels' loop.  Both match the fp64 reference, forward and backward (``M^T``), in both orders."""
    oracle.run_case(B, N, 123, 1, "dense", axis, mix_after_norm, dtype, grid=grid)


@backends("cpu")
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_rows_bundle_larger_than_buffer(oracle, mix_after_norm):
    """A sample's whole grid exceeds the optimal group buffer (K * columns * D > 2**21 floats), so the
    bundle of columns is halved until it fits."""
    oracle.run_case(1, 1 + 32 * 32, 2100, 1, "optimal", "rows", mix_after_norm, torch.float32, grid=(32, 32))


@backends("cpu")
@pytest.mark.parametrize("threads", (1, 2))
def test_thread_count_does_not_change_results(oracle, threads):
    """dweight / dbias come from per-thread partials: any thread count gives a correct sum."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        oracle.run_case(4, 1 + 49, 192, 1, "shift", "rows", False, torch.float32)
        oracle.run_case(4, 1 + 49, 192, 1, "optimal", "tokens", True, torch.float32)
    finally:
        torch.set_num_threads(old)


@backends(*KERNELS)
def test_weight_gradients_are_deterministic(backend):
    """dweight / dbias come from fixed per-block (per-thread, per-program) partials summed in a fixed order:
    bitwise equal runs."""
    backend.skip_unless(torch.bfloat16)
    fwd, bwd = _ops(backend.name)
    B, N, D = 32, 1 + 196, 384
    g = gen(9)
    x = torch.randn(B, N, D, generator=g).to(backend.device, torch.bfloat16)
    w, b = torch.randn(D, generator=g).to(backend.device), torch.randn(D, generator=g).to(backend.device)
    dy = torch.randn(B, N, D, generator=g).to(backend.device, torch.bfloat16)
    code = KIND_CODES["optimal"]
    for man in (False, True):
        _, r, mean, rstd = fwd(x, None, w, b, 1e-6, code, 0, ALPHA, 1, None, 1, 1, man, False)
        runs = [bwd(dy, None, r, w, mean, rstd, code, 0, ALPHA, 1, None, 1, 1, man) for _ in range(3)]
        for other in runs[1:]:
            for a, c in zip(runs[0], other):
                assert torch.equal(a, c)


@backends("cuda")
def test_cuda_matches_cpu_kernel(backend):
    """The CUDA and the C++ CPU kernels agree (same algorithm, fp32 arithmetic)."""
    if nk._ext.backend_status("cpu", "cpu") is not None:
        pytest.skip(f"the CPU kernels cannot run: {nk._ext.backend_status('cpu', 'cpu')}")
    fwd, bwd = _ops("cuda")
    B, N, D, prefix = 3, 1 + 16, 123, 1
    g = gen(5)
    x, r = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    cases = [(kind, 1) for kind in KINDS] + [("shift", -1)]
    for (kind, shift), axis, man in itertools.product(cases, AXES, (False, True)):
        k = mixed_k(B, N, axis, prefix, (4, 4))
        M = quality.mixing_matrix("dense", k, matrix=dense_q(k)).float() if kind == "dense" else None
        grid_w = 4 if axis == "rows" else 1
        args = (1e-6, KIND_CODES[kind], AXIS_CODES[axis], ALPHA, shift)
        tail = (prefix, grid_w, man, False)
        ours = fwd(x.cuda(), r.cuda(), w.cuda(), b.cuda(), *args, None if M is None else M.cuda(), *tail)
        theirs = fwd(x, r, w, b, *args, M, *tail)
        for o, t in zip(ours, theirs):
            torch.testing.assert_close(o.cpu(), t, rtol=1e-5, atol=1e-5)
        dy, dres = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
        bargs = (KIND_CODES[kind], AXIS_CODES[axis], ALPHA, shift)
        ours = bwd(dy.cuda(), dres.cuda(), ours[1], w.cuda(), ours[2], ours[3], *bargs,
                   None if M is None else M.cuda(), prefix, grid_w, man)
        theirs = bwd(dy, dres, theirs[1], w, theirs[2], theirs[3], *bargs, M, prefix, grid_w, man)
        for o, t in zip(ours, theirs):
            torch.testing.assert_close(o.cpu(), t, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# autograd plumbing


@backends(*KERNELS)
def test_unused_residual_out_gets_no_zero_gradient(oracle, backend):
    """Only ``normed`` used: the backward op receives ``d_residual_out=None`` (no zero-filled B x N x D tensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    bwd_name = f"noisynn.{OPS[backend.name][1]}"
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).split(".default")[0] == bwd_name:
                seen.append(args[1])
            if func in (torch.ops.aten.zeros_like.default, torch.ops.aten.fill_.Scalar, torch.ops.aten.zero_.default):
                if args[0].numel() >= 2 * 5 * 16:
                    seen.append(("zero-fill", tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 5, 16, device=backend.device, requires_grad=True)
    r = torch.randn(2, 5, 16, device=backend.device, requires_grad=True)
    normed, _ = oracle.fused(x, r, None, None, mix=NoiseConfig(kind="optimal"), prefix_tokens=1)
    with Record():
        normed.backward(torch.randn_like(normed))
    assert seen == [None], seen


@backends(*ALL)
def test_x_and_residual_gradients_are_independent(oracle, backend):
    """x and residual receive the same gradient values; autograd hands each leaf its own tensor."""
    x = torch.randn(2, 5, 16, device=backend.device, requires_grad=True)
    r = torch.randn(2, 5, 16, device=backend.device, requires_grad=True)
    normed, res = oracle.fused(x, r, None, None, mix=NoiseConfig(kind="shift"), prefix_tokens=1)
    (normed.sum() + res.pow(2).sum()).backward()
    assert torch.equal(x.grad, r.grad)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    before = r.grad.clone()
    x.grad.add_(1.0)
    assert torch.equal(r.grad, before)


# --------------------------------------------------------------------------------------------------
# registration


def _op_args(kind, axis, device, D=33, B=2, N=5, prefix=1, requires_grad=False):
    g = gen(7)
    x, r = (torch.randn(B, N, D, generator=g).to(device).requires_grad_(requires_grad) for _ in range(2))
    w, b = (torch.randn(D, generator=g).to(device).requires_grad_(requires_grad) for _ in range(2))
    k = {"tokens": N - prefix, "rows": 2, "batch": B}[axis]
    M = quality.mixing_matrix("dense", k, matrix=dense_q(k)).float().to(device) if kind == "dense" else None
    grid_w = 2 if axis == "rows" else 1
    return x, r, w, b, M, prefix, grid_w


# test_aot_dispatch_* cannot run in the interpreter: under FunctionalTensorMode triton_op decomposes into
# its kernels, and wrap_triton returns a bare InterpretedFunction (no traceable HOP) for interpreted
# kernels, which then runs on FakeTensors and touches their data pointers.  They run on a GPU.
INTERPRETER_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@backends(*KERNELS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("kind,mix_after_norm", [(k, man) for k in KINDS for man in (False, True)])
def test_opcheck(backend, kind, mix_after_norm, axis):
    """Every opcheck test (schema, autograd registration, fake tensor, aot_dispatch static and dynamic; under
    Triton's interpreter the first three, on the tokens axis)."""
    if backend.interpreted and axis != "tokens":
        pytest.skip("Triton's interpreter is slow: its opcheck runs on the tokens axis (every axis on a GPU)")
    fwd, bwd = _ops(backend.name)
    kw = {"test_utils": INTERPRETER_OPCHECK} if backend.interpreted else {}

    def opcheck(op, args):
        torch.library.opcheck(op, args, **kw)

    x, r, w, b, M, prefix, grid_w = _op_args(kind, axis, backend.device, requires_grad=True)
    code, axis_code = KIND_CODES[kind], AXIS_CODES[axis]
    opcheck(fwd.default, (x, r, w, b, 1e-6, code, axis_code, ALPHA, 1, M, prefix, grid_w, mix_after_norm, False))
    opcheck(fwd.default, (x, None, None, None, 1e-6, code, axis_code, ALPHA, -1, M, prefix, grid_w, mix_after_norm,
                          True))
    with torch.no_grad():
        _, res_out, mean, rstd = fwd(x, r, w, b, 1e-6, code, axis_code, ALPHA, 1, M, prefix, grid_w, mix_after_norm,
                                     False)
    dy, dres = torch.randn_like(res_out), torch.randn_like(res_out)
    for bwd_args in ((dy, dres, res_out, w.detach(), mean, rstd, code, axis_code, ALPHA, 1, M, prefix, grid_w,
                      mix_after_norm),
                     (dy, None, res_out, None, mean, rstd, code, axis_code, ALPHA, -1, M, prefix, grid_w,
                      mix_after_norm)):
        opcheck(bwd.default, bwd_args)


@backends(*KERNELS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_fake_shapes(backend, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    fwd, bwd = _ops(backend.name)
    with FakeTensorMode():
        x = torch.empty(3, 7, 40, dtype=dtype, device=backend.device)
        normed, res_out, mean, rstd = fwd(x, None, None, None, 1e-6, 2, 0, ALPHA, 1, None, 1, 1, False, False)
        assert normed.shape == res_out.shape == (3, 7, 40) and normed.dtype == res_out.dtype == dtype
        assert mean.shape == rstd.shape == (21,) and mean.dtype == rstd.dtype == torch.float32
        dx, dw, db = bwd(normed, None, res_out, None, mean, rstd, 2, 0, ALPHA, 1, None, 1, 1, False)
        assert dx.shape == (3, 7, 40) and dx.dtype == dtype
        assert dw.shape == db.shape == (40,) and dw.dtype == db.dtype == torch.float32


@backends(*CPP)
def test_op_errors(backend):
    x = torch.randn(2, 5, 8, device=backend.device)
    op = _ops(backend.name)[0]
    with pytest.raises(RuntimeError, match="kind code"):
        op(x, None, None, None, 1e-6, 7, 0, ALPHA, 1, None, 0, 1, False, False)
    with pytest.raises(RuntimeError, match="needs mix_matrix"):
        op(x, None, None, None, 1e-6, 3, 0, ALPHA, 1, None, 0, 1, False, False)
    with pytest.raises(RuntimeError, match="grid_w"):
        op(x, None, None, None, 1e-6, 1, 1, ALPHA, 1, None, 0, 3, False, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(x.double(), None, None, None, 1e-6, 1, 0, ALPHA, 1, None, 0, 1, False, False)
    with pytest.raises(RuntimeError, match="shift must be"):
        op(x, None, None, None, 1e-6, 1, 0, ALPHA, 2, None, 0, 1, False, False)


@backends("cuda")
def test_cuda_op_errors(backend):
    x = torch.randn(2, 5, 8, device=backend.device)
    op = _ops(backend.name)[0]
    with pytest.raises(RuntimeError, match="residual is on"):
        op(x, x.cpu(), None, None, 1e-6, 1, 0, ALPHA, 1, None, 0, 1, False, False)
    with pytest.raises(RuntimeError, match="shared memory"):
        op(torch.randn(1, 2, 1 << 17, device=backend.device), None, None, None, 1e-6, 0, 0, ALPHA, 1, None, 0, 1, False,
           False)


@backends(*CPP)
def test_build_info_lists_kernel(backend):
    from noisynn_kernels._ext import extension

    assert "mix_add_layernorm" in extension().build_info()[f"{backend.name}_kernels"]


# --------------------------------------------------------------------------------------------------
# torch.compile

#: (kind, axis, mix_after_norm, the inputs given: residual / weight / bias, Inductor's dtype)
COMPILE_CASES = [("optimal", "tokens", False, "rwb", torch.float16), ("shift", "rows", True, "rwb", torch.float16),
                 ("dense", "batch", False, "rwb", torch.float16), ("shift", "tokens", False, "w", torch.float32)]


def _compile_setup(oracle, kind, axis, mix_after_norm, inputs):
    B, N, D, prefix = 3, 1 + 16, 192, 1
    cfg = make_config(kind, axis, mixed_k(B, N, axis, prefix, (4, 4)))
    vals, leaves = oracle.make_inputs(B, N, D, has_res="r" in inputs, has_w="w" in inputs, has_b="b" in inputs)

    def f(x, residual, weight, bias):
        return oracle.fused(x, residual, weight, bias, mix=cfg, prefix_tokens=prefix, mix_after_norm=mix_after_norm)

    return f, vals, leaves


def _leaf_args(t):
    return t["x"], t["residual"], t["weight"], t["bias"]


@backends(*KERNELS)
@pytest.mark.parametrize("kind,axis,mix_after_norm,inputs", [c[:4] for c in COMPILE_CASES[:3]])
def test_dynamo_keeps_the_op(oracle, backend, kind, axis, mix_after_norm, inputs):
    """Dynamo traces the public op with fullgraph=True (no graph break) and keeps the backend's custom op
    in its graph (no silent bypass).  The recording backend runs that graph eagerly, so this runs under
    Triton's interpreter too; Inductor's lowering of the Triton op needs a GPU (test_torch_compile)."""
    f, vals, leaves = _compile_setup(oracle, kind, axis, mix_after_norm, inputs)
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    t_eager, t_comp = leaves(torch.float32), leaves(torch.float32)
    eager = f(*_leaf_args(t_eager))
    comp = torch.compile(f, backend=recording_backend, fullgraph=True)(*_leaf_args(t_comp))
    fwd_name = f"noisynn.{OPS[backend.name][0]}"
    assert any(str(t).split(".default")[0] == fwd_name for t in targets), "the compiled graph bypassed the op"
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c, e)
    ge, gc = oracle.grads(t_eager, eager, vals), oracle.grads(t_comp, comp, vals)
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name])


@backends("reference", "cpu", "cuda")
@pytest.mark.parametrize("kind", ["shift", "optimal"])
def test_compiled_autograd(oracle, backend, kind):
    """The backward under compiled autograd (``torch._dynamo.compiled_autograd``) gives eager's gradients:
    the op's autograd formula (C++ for the cpu / cuda backends) must be one compiled autograd accepts."""
    from torch._dynamo import compiled_autograd

    g = gen(3)
    base = [torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g), torch.randn(16, generator=g),
            torch.randn(16, generator=g)]
    cfg = NoiseConfig(kind=kind)

    def grads(compiled: bool):
        leaves = [t.clone().to(backend.device).requires_grad_(True) for t in base]
        normed, res = oracle.fused(*leaves, mix=cfg, prefix_tokens=1)
        loss = (normed * normed).sum() + res.sum()
        if compiled:
            torch._dynamo.reset()
            with compiled_autograd._enable(lambda gm: torch.compile(gm, backend="eager")):
                loss.backward()
        else:
            loss.backward()
        return [t.grad for t in leaves]

    for got, want in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, want)


@backends("cpu", "cuda")
def test_create_graph_gives_first_order_gradients_and_refuses_a_second(oracle, backend):
    """The C++ op has no double backward: a backward with ``create_graph=True`` gives the right gradients,
    and differentiating them raises (no silent zero second derivative, no autograd-fallback warning)."""
    import warnings

    g = gen(4)
    base = [torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g), torch.randn(16, generator=g),
            torch.randn(16, generator=g)]
    cfg = NoiseConfig(kind="shift", axis="tokens")

    def grads(create_graph: bool):
        leaves = [t.clone().to(backend.device).requires_grad_(True) for t in base]
        normed, _ = oracle.fused(*leaves, mix=cfg, prefix_tokens=1)
        return torch.autograd.grad((normed * normed).sum(), leaves, create_graph=create_graph)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the dispatcher's autograd-fallback warning would fail here
        first = grads(True)
        for got, want in zip(first, grads(False)):
            torch.testing.assert_close(got.detach(), want)
        assert all(t.requires_grad for t in first)
        for t in first:
            with pytest.raises(RuntimeError, match="no double backward"):
                t.sum().backward()


@pytest.mark.slow
@backends(*KERNELS)
@pytest.mark.parametrize("kind,axis,mix_after_norm,inputs,dtype", COMPILE_CASES)
def test_torch_compile(oracle, backend, kind, axis, mix_after_norm, inputs, dtype):
    """torch.compile (Inductor, fullgraph) of the op matches eager, forward and backward (on the CPU: Inductor's
    C++ code around the C++ op)."""
    backend.skip_if_interpreted("Inductor's lowering of a Triton op needs compiled kernels (a GPU)")
    f, vals, leaves = _compile_setup(oracle, kind, axis, mix_after_norm, inputs)
    torch._dynamo.reset()
    t_eager, t_comp = leaves(dtype), leaves(dtype)
    eager = f(*_leaf_args(t_eager))
    comp = torch.compile(f, fullgraph=True)(*_leaf_args(t_comp))
    fp16 = dtype == torch.float16
    fwd_tol, bwd_tol = ({"atol": 1e-3, "rtol": 1e-3}, {"atol": 1e-2, "rtol": 1e-3}) if fp16 else ({}, {})
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c, e, **fwd_tol)
    ge, gc = oracle.grads(t_eager, eager, vals), oracle.grads(t_comp, comp, vals)
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], **bwd_tol)


# --------------------------------------------------------------------------------------------------
# argument checking


@backends(*ALL)
def test_errors(backend):
    """The package's checks, the same on every backend."""
    dev = backend.device

    def call(*args, **kw):
        return nk.mix_add_layernorm(*args, backend=backend.name, **kw)

    x = torch.randn(2, 5, 8, device=dev)
    with pytest.raises(ShapeError, match="rank 4"):
        call(torch.randn(2, 3, 4, 4, device=dev))
    with pytest.raises(ShapeError, match="residual has shape"):
        call(x, torch.randn(2, 5, 9, device=dev))
    with pytest.raises(ShapeError, match="residual has dtype"):
        call(x, x.half())
    with pytest.raises(ShapeError, match="residual has dtype"):
        call(x, x.double())
    with pytest.raises(ShapeError, match=r"weight has shape \(9,\), expected \(8,\)"):
        call(x, weight=torch.ones(9, device=dev))
    with pytest.raises(ShapeError, match="empty"):
        call(x[:, :0])
    with pytest.raises(ConfigError, match="eps"):
        call(x, eps=0.0)
    with pytest.raises(ConfigError, match="linear transform noise"):
        call(x, mix=NoiseConfig(kind="gaussian"))
    with pytest.raises(ConfigError, match="linear transform noise"):
        call(x, mix="gaussian")
    with pytest.raises(ConfigError, match="mix_after_norm"):
        call(x, mix_after_norm=1)
    with pytest.raises(ShapeError, match="prefix_tokens = 5"):
        call(x, prefix_tokens=5)  # the identity mix still checks the prefix
    with pytest.raises(ShapeError, match="not a square"):
        call(x, mix=NoiseConfig(kind="shift", axis="rows"), prefix_tokens=0)
    with pytest.raises(ShapeError, match="does not match"):
        call(x, mix=NoiseConfig(kind="shift", axis="rows"), prefix_tokens=1, grid=(3, 2))
    with pytest.raises(ShapeError, match=r"dense quality matrix has shape \(3, 3\), expected \(5, 5\)"):
        call(x, mix=NoiseConfig(kind="dense", matrix=torch.zeros(3, 3)))
    with pytest.raises(ShapeError, match=r"expected \(4, 4\)"):
        call(x, mix=NoiseConfig(kind="dense", matrix=dense_q(3)), prefix_tokens=1)
    with pytest.raises(QualityMatrixError, match="not invertible"):
        call(x, mix=NoiseConfig(kind="shift", alpha=0.5), prefix_tokens=1)  # k = 4, a = 0.5


@backends(*KERNELS)
def test_kernel_errors(backend):
    """The fused backends' own limits: their dtypes, and a dense matrix that is a constant in fp32."""
    x = torch.randn(2, 5, 8, device=backend.device)

    def call(*args, **kw):
        return nk.mix_add_layernorm(*args, backend=backend.name, **kw)

    with pytest.raises(ShapeError, match="dtype torch.float64"):
        call(x.double())
    with pytest.raises(ConfigError, match="requires grad"):
        call(x, mix=NoiseConfig(kind="dense", matrix=dense_q(4).requires_grad_()), prefix_tokens=1)
    bad_q = torch.full((4, 4), 1e300, dtype=torch.float64)  # finite in fp64, inf in the kernels' fp32
    with pytest.raises(ConfigError, match="non-finite"):
        call(x, mix=NoiseConfig(kind="dense", matrix=bad_q, check_matrix=False), prefix_tokens=1)


@backends("triton")
def test_triton_limits(backend):
    """Any D: a row longer than one block is done in chunks (D = 20000: three of 8192 forward, five of 4096
    backward), matching the reference; Triton's interpreter has no bfloat16."""
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(1, 3, 20000, generator=g) for _ in range(2))
    cfg = nk.NoiseConfig(kind="optimal")
    outs = [nk.mix_add_layernorm(x.to(backend.device), r.to(backend.device), mix=cfg, prefix_tokens=1,
                                 backend="triton")[0].cpu(),
            nk.mix_add_layernorm(x.double(), r.double(), mix=cfg, prefix_tokens=1, backend="reference")[0]]
    torch.testing.assert_close(outs[0].double(), outs[1], rtol=0, atol=1e-4)
    if backend.interpreted:
        with pytest.raises(BackendUnavailableError, match="bfloat16"):
            nk.mix_add_layernorm(torch.randn(2, 5, 8, dtype=torch.bfloat16), backend="triton")


def test_unknown_backend():
    with pytest.raises(BackendUnavailableError, match="not a backend"):
        nk.mix_add_layernorm(torch.randn(2, 5, 4), backend="fast")


# --------------------------------------------------------------------------------------------------
# the C++ CPU kernels: instruction sets, huge-page outputs


def _env(**extra):
    env = dict(os.environ)
    env.update(extra)
    return env


@backends("cpu")
def test_build_info_reports_the_instruction_set(backend):
    from noisynn_kernels._ext import extension

    info = extension().build_info()
    assert info["cpu_hugepage_outputs"] is (os.environ.get("NOISYNN_CPU_HUGEPAGES") == "1")
    assert info["cpu_isas"][0] == "default"
    assert set(info["cpu_isas"]) <= {"default", "avx2"}
    assert info["cpu_isa"] in info["cpu_isas"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and "avx2" in info["cpu_isas"]:
        assert info["cpu_isa"] == "avx2"


@backends("cpu")
def test_baseline_instruction_set_matches_reference(backend):
    """ATEN_CPU_CAPABILITY=default selects the baseline build of the kernels (the one machines without AVX2
    run); the cpu backend's oracle tests of this file must pass on it too, in a fresh process."""
    env = _env(ATEN_CPU_CAPABILITY="default")
    isa = subprocess.run([sys.executable, "-c", "from noisynn_kernels._ext import extension; "
                          "print(extension().build_info()['cpu_isa'])"], env=env, capture_output=True, text=True)
    assert isa.returncode == 0, isa.stderr
    assert isa.stdout.strip() == "default"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                          "cpu and (test_matches_reference or test_odd_sizes or test_straight_through)"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-3000:]


_CPU_CALL = ("import sys, torch\n"
             "import noisynn_kernels as nk\n"
             "from noisynn_kernels import NoiseConfig\n"
             "from noisynn_kernels._ext import extension\n")


@backends("cpu")
def test_instruction_sets_agree(oracle):
    """Both builds add in the same order (8-lane vector extensions); they may differ only by FMA contraction."""
    B, N, D = 3, 1 + 16, 200
    t = oracle.make_inputs(B, N, D, has_res=True, has_w=True, has_b=True, seed=5)[1](torch.float32)
    args = tuple(t[k].detach() for k in ("x", "residual", "weight", "bias"))
    normed, res = oracle.fused(*args, mix=NoiseConfig(kind="optimal", axis="rows"), prefix_tokens=1, grid=(4, 4))
    code = _CPU_CALL + (
        "assert extension().build_info()['cpu_isa'] == 'default'\n"
        "x, r, w, b = torch.load(sys.argv[1])\n"
        "out = nk.mix_add_layernorm(x, r, w, b, 1e-6, mix=NoiseConfig(kind='optimal', axis='rows'), prefix_tokens=1,\n"
        "                           grid=(4, 4), backend='cpu')\n"
        "torch.save(out, sys.argv[2])\n")
    with tempfile.TemporaryDirectory() as d:
        torch.save(args, f"{d}/in.pt")
        run = subprocess.run([sys.executable, "-c", code, f"{d}/in.pt", f"{d}/out.pt"],
                             env=_env(ATEN_CPU_CAPABILITY="default"), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        normed_default, res_default = torch.load(f"{d}/out.pt")
    torch.testing.assert_close(res_default, res, rtol=0, atol=4e-6)
    torch.testing.assert_close(normed_default, normed, rtol=0, atol=4e-5)


@backends("cpu")
def test_hugepage_advice_changes_no_data(oracle):
    """With NOISYNN_CPU_HUGEPAGES=1 outputs of >= 4 MiB get madvise(MADV_HUGEPAGE) (a hint; off by default).
    The results must be bitwise the same either way."""
    B, N, D = 8, 1 + 196, 768  # 4.8 MB per output
    g = gen(11)
    x, r = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    x.requires_grad_()
    normed, res = oracle.fused(x, r, None, None, mix=NoiseConfig(kind="shift", axis="tokens"), prefix_tokens=1)
    (dx,) = torch.autograd.grad(normed, x, torch.ones_like(normed))
    code = _CPU_CALL + (
        "assert extension().build_info()['cpu_hugepage_outputs'] is True\n"
        "x, r = torch.load(sys.argv[1]); x.requires_grad_()\n"
        "normed, res = nk.mix_add_layernorm(x, r, None, None, 1e-6, mix=NoiseConfig(kind='shift'), prefix_tokens=1,\n"
        "                                   backend='cpu')\n"
        "(dx,) = torch.autograd.grad(normed, x, torch.ones_like(normed))\n"
        "torch.save((normed.detach(), res.detach(), dx), sys.argv[2])\n")
    with tempfile.TemporaryDirectory() as d:
        torch.save((x.detach(), r), f"{d}/in.pt")
        run = subprocess.run([sys.executable, "-c", code, f"{d}/in.pt", f"{d}/out.pt"],
                             env=_env(NOISYNN_CPU_HUGEPAGES="1"), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        normed_on, res_on, dx_on = torch.load(f"{d}/out.pt")
    assert torch.equal(normed_on, normed.detach()) and torch.equal(res_on, res.detach()) and torch.equal(dx_on, dx)
