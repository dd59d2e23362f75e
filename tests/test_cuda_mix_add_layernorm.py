"""CUDA fused residual add + (I + Q) mix + LayerNorm (noisynn::mix_add_layernorm_fwd_cuda/bwd_cuda) vs the oracle
:func:`noisynn_kernels.reference.mix_add_layernorm`.  Needs a GPU and an extension built with CUDA: everything
here skips otherwise (tests/test_build.py covers the build, the registration and the fake implementations
on any machine).

Tolerance (flash-attention's rule, not loosened): with ``ref64`` the reference on float64 copies of the
inputs and ``ref_same`` the reference run in the kernel's dtype on the GPU,
``max|ours - ref64| <= 2 * max|ref_same - ref64| + atol``, atol = 1e-5 (fp32), 1e-3 (fp16), 1e-2 (bf16).
The same rule is applied to every gradient (dx, dresidual, dweight, dbias), taken by autograd through
both outputs with random upstream gradients.
"""

import itertools

import pytest
import torch

from noisynn_kernels import NoiseConfig, quality, reference
from noisynn_kernels.ops import cuda_mix_add_layernorm as cuda_op

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not cuda_op.available(),
                       reason="needs a CUDA device and noisynn_kernels._C built with its CUDA kernels "
                              "(NOISYNN_BUILD_CUDA=1)"),
]

DEVICE = "cuda"

from _oracle import ALPHA, ATOL, AXES, KINDS, Oracle, dense_q, gen as _gen, mixed_k  # noqa: E402

ORACLE = Oracle(cuda_op.launch, "cuda")
fused, make_inputs, run_case = ORACLE.fused, ORACLE.make_inputs, ORACLE.run_case


# --------------------------------------------------------------------------------------------------
# kernel vs reference


def _main_cases():
    """kinds x axes x order x prefix 0/1/5 x D 123/192 x fp32/fp16/bf16; B 2/3, the eight residual / weight /
    bias combinations and non-contiguous inputs rotate through them.  D = 123 runs the scalar path, D = 192
    the 16-byte vector path."""
    flags = list(itertools.product((True, False), repeat=3))
    cases = []
    for i, (dtype, kind, axis, man, prefix, D) in enumerate(itertools.product(
            (torch.float32, torch.float16, torch.bfloat16), KINDS, AXES, (False, True), (0, 1, 5), (123, 192))):
        B = 2 + (i // 2) % 2
        has_res, has_w, has_b = flags[(i * 3 + i // 8) % 8]
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


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mix_after_norm", (False, True))
@pytest.mark.parametrize("D", (768, 4104, 8192))
def test_wide_rows(D, mix_after_norm, kind, dtype):
    """Several vectors per thread and 512-thread rows; D = 8192 needs more than 48 KiB of shared memory in
    the backward (opt-in)."""
    run_case(2, 1 + 9, D, 1, kind, "tokens", mix_after_norm, dtype)


@pytest.mark.parametrize("kind", ("identity", "shift", "optimal"))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_many_rows(kind, mix_after_norm):
    """More rows than resident blocks: every backward block loops over a range of rows (dweight partials)."""
    run_case(64, 1 + 196, 192, 1, kind, "rows", mix_after_norm, torch.bfloat16)


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("grid", ((2, 8), (8, 2)))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_non_square_grid(kind, grid, mix_after_norm):
    run_case(2, 1 + 16, 123, 1, kind, "rows", mix_after_norm, torch.float32, grid=grid)


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("axis,B,N,prefix,grid", [("tokens", 2, 8, 1, None), ("rows", 2, 22, 1, (7, 3)),
                                                  ("batch", 7, 3, 1, None), ("batch", 1, 6, 1, None),
                                                  ("tokens", 2, 2, 1, None)])
def test_odd_sizes(kind, axis, B, N, prefix, grid):
    """k = 7 on every axis (odd), and k = 1 (batch of one, one patch token: the identity)."""
    for man in (False, True):
        run_case(B, N, 123, prefix, kind, axis, man, torch.float32, grid=grid)


@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_optimal_long_group(mix_after_norm):
    """A long tokens group: the column sum splits the group's rows over the block's slices."""
    run_case(1, 2 + 1040, 2048, 2, "optimal", "tokens", mix_after_norm, torch.float32)


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_straight_through(kind, mix_after_norm):
    run_case(2, 1 + 16, 123, 1, kind, "tokens", mix_after_norm, torch.float32, straight_through=True)


@pytest.mark.parametrize("use", (("normed",), ("residual_out",)))
@pytest.mark.parametrize("kind,mix_after_norm", (("optimal", False), ("shift", True)))
def test_one_output_used(use, kind, mix_after_norm):
    run_case(2, 1 + 16, 123, 1, kind, "tokens", mix_after_norm, torch.float32, use=use)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_misaligned_inputs_take_the_scalar_path(dtype):
    """Rows of a vector-friendly D at an address that is not 16-byte aligned (a storage offset)."""
    B, N, D = 2, 17, 192
    g = _gen(3)
    flat = torch.randn(B * N * D + 1, generator=g).to(device=DEVICE, dtype=dtype)
    x = flat[1:].view(B, N, D)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    cfg = NoiseConfig(kind="shift", axis="tokens", alpha=ALPHA, allow_batch_dependence=True)
    normed, res_out = fused(x, None, None, None, mix=cfg, prefix_tokens=1)
    ref_normed, ref_res = reference.mix_add_layernorm(x.double(), None, None, None, 1e-6, kind="shift", axis="tokens",
                                                      alpha=ALPHA, prefix_tokens=1)
    atol = ATOL[dtype] * 10
    torch.testing.assert_close(normed.double(), ref_normed, rtol=0, atol=atol)
    torch.testing.assert_close(res_out.double(), ref_res, rtol=0, atol=atol)


def test_matches_cpu_kernel():
    """The CUDA and the C++ CPU kernels agree (same algorithm, fp32 arithmetic)."""
    from noisynn_kernels.ops import cpu_mix_add_layernorm as cpu_op

    if not cpu_op.available():
        pytest.skip("the extension lacks the CPU kernels")
    B, N, D, prefix = 3, 1 + 16, 123, 1
    g = _gen(5)
    x, r = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    for kind, axis, man in itertools.product(KINDS, AXES, (False, True)):
        k = mixed_k(B, N, axis, prefix, (4, 4))
        M = quality.mixing_matrix("dense", k, matrix=dense_q(k)).float() if kind == "dense" else None
        grid_w = 4 if axis == "rows" else 1
        args = (1e-6, cuda_op.KIND_CODES[kind], cuda_op.AXIS_CODES[axis], ALPHA)
        tail = (prefix, grid_w, man, False)
        ours = torch.ops.noisynn.mix_add_layernorm_fwd_cuda(x.cuda(), r.cuda(), w.cuda(), b.cuda(), *args,
                                                            None if M is None else M.cuda(), *tail)
        theirs = torch.ops.noisynn.mix_add_layernorm_fwd_cpu(x, r, w, b, *args, M, *tail)
        for o, t in zip(ours, theirs):
            torch.testing.assert_close(o.cpu(), t, rtol=1e-5, atol=1e-5)
        dy, dres = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
        bargs = (cuda_op.KIND_CODES[kind], cuda_op.AXIS_CODES[axis], ALPHA)
        ours = torch.ops.noisynn.mix_add_layernorm_bwd_cuda(dy.cuda(), dres.cuda(), ours[1], w.cuda(), ours[2], ours[3],
                                                            *bargs, None if M is None else M.cuda(), prefix, grid_w, man)
        theirs = torch.ops.noisynn.mix_add_layernorm_bwd_cpu(dy, dres, theirs[1], w, theirs[2], theirs[3], *bargs, M,
                                                             prefix, grid_w, man)
        for o, t in zip(ours, theirs):
            torch.testing.assert_close(o.cpu(), t, rtol=1e-4, atol=1e-4)


def test_weight_gradients_are_deterministic():
    """dweight / dbias come from fixed per-block partials summed in a fixed order: bitwise equal runs."""
    B, N, D = 32, 1 + 196, 384
    g = _gen(9)
    x = torch.randn(B, N, D, generator=g).to(DEVICE, torch.bfloat16)
    w, b = torch.randn(D, generator=g).to(DEVICE), torch.randn(D, generator=g).to(DEVICE)
    dy = torch.randn(B, N, D, generator=g).to(DEVICE, torch.bfloat16)
    for man in (False, True):
        _, r, mean, rstd = torch.ops.noisynn.mix_add_layernorm_fwd_cuda(x, None, w, b, 1e-6, 2, 0, ALPHA, None, 1, 1,
                                                                        man, False)
        runs = [torch.ops.noisynn.mix_add_layernorm_bwd_cuda(dy, None, r, w, mean, rstd, 2, 0, ALPHA, None, 1, 1, man)
                for _ in range(3)]
        for other in runs[1:]:
            for a, c in zip(runs[0], other):
                assert torch.equal(a, c)


def test_functional_dispatch_runs_cuda_backend():
    import noisynn_kernels as nk

    x = torch.randn(2, 17, 64, device=DEVICE)
    cfg = NoiseConfig(kind="optimal", axis="tokens", allow_batch_dependence=True)
    ours = nk.mix_add_layernorm(x, None, None, None, mix=cfg, prefix_tokens=1, backend="cuda")
    ref = nk.mix_add_layernorm(x, None, None, None, mix=cfg, prefix_tokens=1, backend="reference")
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_compile_keeps_the_op():
    cfg = NoiseConfig(kind="shift", axis="tokens", alpha=ALPHA, allow_batch_dependence=True)
    x = torch.randn(2, 17, 64, device=DEVICE)
    w = torch.randn(64, device=DEVICE)

    def f(x, w):
        return fused(x, None, w, None, mix=cfg, prefix_tokens=1)

    compiled = torch.compile(f, fullgraph=True)
    for o, e in zip(compiled(x, w), f(x, w)):
        torch.testing.assert_close(o, e)


# --------------------------------------------------------------------------------------------------
# registration


def _op_args(kind, axis, D=33, B=2, N=5, prefix=1, requires_grad=False):
    g = _gen(7)
    x, r = (torch.randn(B, N, D, generator=g).to(DEVICE).requires_grad_(requires_grad) for _ in range(2))
    w, b = (torch.randn(D, generator=g).to(DEVICE).requires_grad_(requires_grad) for _ in range(2))
    k = {"tokens": N - prefix, "rows": 2, "batch": B}[axis]
    M = quality.mixing_matrix("dense", k, matrix=dense_q(k)).float().to(DEVICE) if kind == "dense" else None
    grid_w = 2 if axis == "rows" else 1
    return x, r, w, b, M, prefix, grid_w


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("kind,mix_after_norm", [(k, man) for k in KINDS for man in (False, True)])
def test_opcheck(kind, mix_after_norm, axis):
    """Every opcheck test (schema, autograd registration, fake tensor, aot_dispatch static and dynamic)."""
    x, r, w, b, M, prefix, grid_w = _op_args(kind, axis, requires_grad=True)
    code, axis_code = cuda_op.KIND_CODES[kind], cuda_op.AXIS_CODES[axis]
    op = torch.ops.noisynn.mix_add_layernorm_fwd_cuda.default
    torch.library.opcheck(op, (x, r, w, b, 1e-6, code, axis_code, ALPHA, M, prefix, grid_w, mix_after_norm, False))
    torch.library.opcheck(op, (x, None, None, None, 1e-6, code, axis_code, ALPHA, M, prefix, grid_w, mix_after_norm,
                               True))
    with torch.no_grad():
        _, res_out, mean, rstd = torch.ops.noisynn.mix_add_layernorm_fwd_cuda(
            x, r, w, b, 1e-6, code, axis_code, ALPHA, M, prefix, grid_w, mix_after_norm, False)
    dy, dres = torch.randn_like(res_out), torch.randn_like(res_out)
    for bwd_args in ((dy, dres, res_out, w.detach(), mean, rstd, code, axis_code, ALPHA, M, prefix, grid_w,
                      mix_after_norm),
                     (dy, None, res_out, None, mean, rstd, code, axis_code, ALPHA, M, prefix, grid_w,
                      mix_after_norm)):
        torch.library.opcheck(torch.ops.noisynn.mix_add_layernorm_bwd_cuda.default, bwd_args)


def test_op_errors():
    x = torch.randn(2, 5, 8, device=DEVICE)
    op = torch.ops.noisynn.mix_add_layernorm_fwd_cuda
    with pytest.raises(RuntimeError, match="kind code"):
        op(x, None, None, None, 1e-6, 7, 0, ALPHA, None, 0, 1, False, False)
    with pytest.raises(RuntimeError, match="needs mix_matrix"):
        op(x, None, None, None, 1e-6, 3, 0, ALPHA, None, 0, 1, False, False)
    with pytest.raises(RuntimeError, match="grid_w"):
        op(x, None, None, None, 1e-6, 1, 1, ALPHA, None, 0, 3, False, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(x.double(), None, None, None, 1e-6, 1, 0, ALPHA, None, 0, 1, False, False)
    with pytest.raises(RuntimeError, match="residual is on"):
        op(x, x.cpu(), None, None, 1e-6, 1, 0, ALPHA, None, 0, 1, False, False)
    with pytest.raises(RuntimeError, match="shared memory"):
        op(torch.randn(1, 2, 1 << 17, device=DEVICE), None, None, None, 1e-6, 0, 0, ALPHA, None, 0, 1, False, False)
