"""Triton fused residual add + (I + Q) mix + LayerNorm (noisynn::mix_add_layernorm_fwd/bwd) vs the oracle
:func:`noisynn_kernels.reference.mix_add_layernorm`.

Without CUDA the kernels run on CPU in Triton's interpreter: TRITON_INTERPRET=1 is set below, before
triton or the kernel modules are imported (no bf16 there).  With CUDA every test runs the compiled
kernels on the GPU, and the tests marked ``gpu`` (bf16, torch.compile, full opcheck) run too.

Tolerance (flash-attention's rule, not loosened): with ``ref64`` the reference on float64 copies of the
inputs and ``ref_same`` the reference run in the kernel's dtype,
``max|out - ref64| <= 2 * max|ref_same - ref64| + atol``, atol = 1e-5 (fp32), 1e-3 (fp16), 1e-2 (bf16).
The same rule is applied to every gradient (dx, dresidual, dweight, dbias), taken by autograd through
both outputs with random upstream gradients.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import itertools  # noqa: E402

import pytest  # noqa: E402

from noisynn_kernels import NoiseConfig, quality, reference  # noqa: E402
from noisynn_kernels.errors import BackendUnavailableError, ConfigError, QualityMatrixError, ShapeError  # noqa: E402
from noisynn_kernels.ops import mix_add_layernorm as mal  # noqa: E402
from noisynn_kernels.ops.mix_add_layernorm import mix_add_layernorm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not mal.INTERPRETED:
    raise RuntimeError("noisynn_kernels.ops.mix_add_layernorm was imported before TRITON_INTERPRET=1 was set, so its "
                       "kernels cannot run on CPU; set TRITON_INTERPRET=1 before anything imports it")

from _oracle import ALPHA, AXES, KINDS, Oracle, dense_q, gen as _gen, mixed_k  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------------------------------
# helpers


def make_config(kind, axis, k, *, alpha=ALPHA, seed=0, **kw):
    Q = dense_q(k, seed) if kind == "dense" else None
    return NoiseConfig(kind=kind, axis=axis, alpha=alpha, matrix=Q, allow_batch_dependence=True, **kw)


# the references run on CPU (fp16 included), also when the kernels run on a GPU
ORACLE = Oracle(mal.launch, DEVICE, reference_device="cpu")
run_case, make_inputs = ORACLE.run_case, ORACLE.make_inputs


# --------------------------------------------------------------------------------------------------
# kernel vs reference


def _main_cases():
    """Every kind x axis x order, in fp32 and fp16; prefix 0/1/5, D 123/192, B 2/3, the eight
    residual/weight/bias combinations and non-contiguous inputs rotate through them."""
    flags = list(itertools.product((True, False), repeat=3))
    cases = []
    for i, (dtype, kind, axis, man) in enumerate(itertools.product((torch.float32, torch.float16), KINDS, AXES,
                                                                   (False, True))):
        prefix = (0, 1, 5)[i % 3]
        D = (123, 192)[(i // 3) % 2]
        B = 2 + (i // 2) % 2
        has_res, has_w, has_b = flags[(i * 3) % 8]
        noncontig = i % 4 == 1
        cases.append(pytest.param(B, prefix, D, kind, axis, man, dtype, has_res, has_w, has_b, noncontig,
                                  id=f"{str(dtype)[6:]}-{kind}-{axis}-{'after' if man else 'before'}-P{prefix}-D{D}"
                                     f"-B{B}-{'r' if has_res else ''}{'w' if has_w else ''}{'b' if has_b else ''}"
                                     f"{'-noncontig' if noncontig else ''}"))
    return cases


@pytest.mark.parametrize("B,prefix,D,kind,axis,mix_after_norm,dtype,has_res,has_w,has_b,noncontig", _main_cases())
def test_matches_reference(B, prefix, D, kind, axis, mix_after_norm, dtype, has_res, has_w, has_b, noncontig):
    run_case(B, prefix + 16, D, prefix, kind, axis, mix_after_norm, dtype, has_res=has_res, has_w=has_w, has_b=has_b,
             noncontig=noncontig)


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("grid", ((2, 8), (8, 2)))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_non_square_grid(kind, grid, mix_after_norm):
    run_case(2, 1 + 16, 123, 1, kind, "rows", mix_after_norm, torch.float32, grid=grid)


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("axis,B,N,prefix,grid", [("tokens", 2, 8, 1, None), ("rows", 2, 22, 1, (7, 3)),
                                                  ("batch", 7, 3, 1, None), ("batch", 1, 6, 1, None)])
def test_odd_sizes(kind, axis, B, N, prefix, grid):
    """k = 7 on every axis (odd, not a power of two) and k = 1 (batch of one: the identity)."""
    for man in (False, True):
        run_case(B, N, 123, prefix, kind, axis, man, torch.float32, grid=grid)


@pytest.mark.parametrize("D", (384, 768, 1024))
@pytest.mark.parametrize("kind", ("shift", "optimal"))
def test_model_widths(D, kind):
    run_case(2, 1 + 4, D, 1, kind, "rows", kind == "optimal", torch.float32)


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_straight_through(kind, mix_after_norm):
    """Forward M x, gradient the identity (the reference's x + (Mx - x).detach())."""
    run_case(2, 1 + 16, 123, 1, kind, "tokens", mix_after_norm, torch.float32, straight_through=True)


@pytest.mark.parametrize("use", (("normed",), ("residual_out",)))
@pytest.mark.parametrize("kind,mix_after_norm", (("optimal", False), ("shift", True)))
def test_one_output_used(use, kind, mix_after_norm):
    """Only one output reaches the loss: the other's gradient is absent (None or zeros) in backward."""
    run_case(2, 1 + 16, 123, 1, kind, "tokens", mix_after_norm, torch.float32, use=use)


def test_no_mix_is_residual_layernorm():
    """mix=None: plain fused residual add + LayerNorm; equal to torch's layer_norm."""
    vals, leaves = make_inputs(2, 9, 123, has_res=True, has_w=True, has_b=True)
    t = leaves(torch.float32)
    normed, res_out = mix_add_layernorm(t["x"], t["residual"], t["weight"], t["bias"], 1e-5)
    s = t["x"] + t["residual"]
    torch.testing.assert_close(res_out, s)
    torch.testing.assert_close(normed, torch.nn.functional.layer_norm(s, (123,), t["weight"], t["bias"], 1e-5),
                               atol=1e-5, rtol=1e-5)


def test_prefix_tokens_are_added_and_normalized_but_not_mixed():
    vals, leaves = make_inputs(2, 5 + 16, 123, has_res=True, has_w=False, has_b=False)
    t = leaves(torch.float32)
    cfg = make_config("optimal", "tokens", 16)
    normed, res_out = mix_add_layernorm(t["x"], t["residual"], mix=cfg, prefix_tokens=5)
    s = (t["x"] + t["residual"]).detach()
    torch.testing.assert_close(res_out[:, :5], s[:, :5])
    assert not torch.allclose(res_out[:, 5:], s[:, 5:])
    torch.testing.assert_close(normed[:, :5], reference.layer_norm(s[:, :5], None, None, 1e-6), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# registration


def _op_args(kind, D=33, B=2, N=5, prefix=1, requires_grad=False):
    g = _gen(7)
    x, r = (torch.randn(B, N, D, generator=g).to(DEVICE).requires_grad_(requires_grad) for _ in range(2))
    w, b = (torch.randn(D, generator=g).to(DEVICE).requires_grad_(requires_grad) for _ in range(2))
    k = N - prefix
    M = quality.mixing_matrix("dense", k, matrix=dense_q(k)).float().to(DEVICE) if kind == "dense" else None
    return x, r, w, b, M, prefix


# test_aot_dispatch_* cannot run in the interpreter: under FunctionalTensorMode triton_op decomposes into
# its kernels, and wrap_triton returns a bare InterpretedFunction (no traceable HOP) for interpreted
# kernels, which then runs on FakeTensors and touches their data pointers.  They run on a GPU below.
CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def _opcheck(kind, mix_after_norm, test_utils):
    x, r, w, b, M, prefix = _op_args(kind, requires_grad=True)
    code = mal.KIND_CODES[kind]
    fwd_args = (x, r, w, b, 1e-6, code, mal.AXIS_CODES["tokens"], ALPHA, M, prefix, 1, mix_after_norm, False)
    torch.library.opcheck(torch.ops.noisynn.mix_add_layernorm_fwd.default, fwd_args, test_utils=test_utils)
    with torch.no_grad():
        _, res_out, mean, rstd = torch.ops.noisynn.mix_add_layernorm_fwd(*fwd_args)
    dy, dres = torch.randn_like(res_out), torch.randn_like(res_out)
    bwd_args = (dy, dres, res_out, w.detach(), mean, rstd, code, mal.AXIS_CODES["tokens"], ALPHA, M, prefix, 1,
                mix_after_norm)
    torch.library.opcheck(torch.ops.noisynn.mix_add_layernorm_bwd.default, bwd_args, test_utils=test_utils)
    bwd_args = (dy, None, res_out, None, mean, rstd, code, mal.AXIS_CODES["tokens"], ALPHA, M, prefix, 1,
                mix_after_norm)
    torch.library.opcheck(torch.ops.noisynn.mix_add_layernorm_bwd.default, bwd_args, test_utils=test_utils)


@pytest.mark.parametrize("kind,mix_after_norm", [(k, man) for k in KINDS for man in (False, True)])
def test_opcheck(kind, mix_after_norm):
    _opcheck(kind, mix_after_norm, CPU_OPCHECK)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(3, 7, 40, dtype=torch.float16, device=DEVICE)
        normed, res_out, mean, rstd = torch.ops.noisynn.mix_add_layernorm_fwd(x, None, None, None, 1e-6, 2, 0, ALPHA,
                                                                               None, 1, 1, False, False)
        assert normed.shape == res_out.shape == (3, 7, 40) and normed.dtype == torch.float16
        assert mean.shape == rstd.shape == (21,) and mean.dtype == torch.float32
        dx, dw, db = torch.ops.noisynn.mix_add_layernorm_bwd(normed, None, res_out, None, mean, rstd, 2, 0, ALPHA,
                                                             None, 1, 1, False)
        assert dx.shape == (3, 7, 40) and dw.shape == db.shape == (40,)


# --------------------------------------------------------------------------------------------------
# argument checking


def test_errors():
    x = torch.randn(2, 5, 8, device=DEVICE)
    with pytest.raises(ShapeError, match="rank 4"):
        mix_add_layernorm(torch.randn(2, 3, 4, 4, device=DEVICE))
    with pytest.raises(ShapeError, match="residual has shape"):
        mix_add_layernorm(x, torch.randn(2, 5, 9, device=DEVICE))
    with pytest.raises(ShapeError, match="residual has dtype"):
        mix_add_layernorm(x, x.half())
    with pytest.raises(ShapeError, match=r"weight has shape \(9,\), expected \(8,\)"):
        mix_add_layernorm(x, weight=torch.ones(9, device=DEVICE))
    with pytest.raises(ShapeError, match="dtype torch.float64"):
        mix_add_layernorm(x.double())
    with pytest.raises(ShapeError, match="empty"):
        mix_add_layernorm(x[:, :0])
    with pytest.raises(ConfigError, match="eps"):
        mix_add_layernorm(x, eps=0.0)
    with pytest.raises(ConfigError, match="linear transform noise"):
        mix_add_layernorm(x, mix=NoiseConfig(kind="gaussian"))
    with pytest.raises(ConfigError, match="mix_after_norm"):
        mix_add_layernorm(x, mix_after_norm=1)
    with pytest.raises(ShapeError, match="prefix_tokens = 5"):
        mix_add_layernorm(x, prefix_tokens=5)
    with pytest.raises(ShapeError, match="not a square"):
        mix_add_layernorm(x, mix=NoiseConfig(kind="shift", axis="rows"), prefix_tokens=0)
    with pytest.raises(ShapeError, match="does not match"):
        mix_add_layernorm(x, mix=NoiseConfig(kind="shift", axis="rows"), prefix_tokens=1, grid=(3, 2))
    with pytest.raises(ShapeError, match=r"expected \(4, 4\)"):
        mix_add_layernorm(x, mix=NoiseConfig(kind="dense", matrix=dense_q(3)), prefix_tokens=1)
    with pytest.raises(QualityMatrixError, match="not invertible"):
        mix_add_layernorm(x, mix=NoiseConfig(kind="shift", alpha=0.5), prefix_tokens=1)  # k = 4, a = 0.5
    with pytest.raises(ConfigError, match="requires grad"):
        mix_add_layernorm(x, mix=NoiseConfig(kind="dense", matrix=dense_q(4).requires_grad_()), prefix_tokens=1)
    bad_q = torch.full((4, 4), 1e300, dtype=torch.float64)  # finite in fp64, inf in the kernels' fp32
    with pytest.raises(ConfigError, match="non-finite"):
        mix_add_layernorm(x, mix=NoiseConfig(kind="dense", matrix=bad_q, check_matrix=False), prefix_tokens=1)
    with pytest.raises(ShapeError, match="too large"):
        mix_add_layernorm(torch.empty(1, 1, 20000, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter-only limits")
def test_interpreter_limits():
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        mix_add_layernorm(torch.randn(2, 5, 8, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------------
# GPU only


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_bf16_matches_reference(kind, axis, mix_after_norm):
    run_case(3, 1 + 16, 192, 1, kind, axis, mix_after_norm, torch.bfloat16, noncontig=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind,mix_after_norm", [(k, man) for k in KINDS for man in (False, True)])
def test_opcheck_full_gpu(kind, mix_after_norm):
    _opcheck(kind, mix_after_norm, ("test_schema", "test_autograd_registration", "test_faketensor",
                                    "test_aot_dispatch_static", "test_aot_dispatch_dynamic"))


COMPILE_CASES = [("optimal", "tokens", False), ("shift", "rows", True), ("dense", "batch", False)]


def _compile_setup(kind, axis, mix_after_norm, dtype):
    B, N, D, prefix = 3, 1 + 16, 192, 1
    cfg = make_config(kind, axis, mixed_k(B, N, axis, prefix, (4, 4)))
    vals, leaves = make_inputs(B, N, D, has_res=True, has_w=True, has_b=True)

    def f(x, residual, weight, bias):
        return mix_add_layernorm(x, residual, weight, bias, mix=cfg, prefix_tokens=prefix,
                                 mix_after_norm=mix_after_norm)

    return f, vals, leaves


@pytest.mark.parametrize("kind,axis,mix_after_norm", COMPILE_CASES)
def test_dynamo_keeps_the_op(kind, axis, mix_after_norm):
    """Dynamo traces the checked entry point with fullgraph=True (no graph break) and keeps the custom op
    in its graph (no silent bypass).  The recording backend runs that graph eagerly, so this runs on CPU
    too; Inductor's lowering of the op needs a GPU (test_torch_compile)."""
    f, vals, leaves = _compile_setup(kind, axis, mix_after_norm, torch.float32)
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    t_eager, t_comp = leaves(torch.float32), leaves(torch.float32)
    eager = f(t_eager["x"], t_eager["residual"], t_eager["weight"], t_eager["bias"])
    comp = torch.compile(f, backend=recording_backend, fullgraph=True)(t_comp["x"], t_comp["residual"],
                                                                       t_comp["weight"], t_comp["bias"])
    assert torch.ops.noisynn.mix_add_layernorm_fwd.default in targets, "the compiled graph bypassed the op"
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c, e)
    ge, gc = ORACLE.grads(t_eager, eager, vals), ORACLE.grads(t_comp, comp, vals)
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name])


@gpu
@needs_cuda
@pytest.mark.parametrize("kind,axis,mix_after_norm", COMPILE_CASES)
def test_torch_compile(kind, axis, mix_after_norm):
    """torch.compile (Inductor) of the op matches eager, forward and backward, in fp16."""
    f, vals, leaves = _compile_setup(kind, axis, mix_after_norm, torch.float16)
    torch._dynamo.reset()
    t_eager, t_comp = leaves(torch.float16), leaves(torch.float16)
    eager = f(t_eager["x"], t_eager["residual"], t_eager["weight"], t_eager["bias"])
    comp = torch.compile(f, fullgraph=True)(t_comp["x"], t_comp["residual"], t_comp["weight"], t_comp["bias"])
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c, e, atol=1e-3, rtol=1e-3)
    ge, gc = ORACLE.grads(t_eager, eager, vals), ORACLE.grads(t_comp, comp, vals)
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], atol=1e-2, rtol=1e-3)
