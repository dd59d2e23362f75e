"""C++ CPU fused residual add + (I + Q) mix + LayerNorm (noisynn::mix_add_layernorm_fwd_cpu/bwd_cpu) vs the
oracle :func:`noisynn_kernels.reference.mix_add_layernorm`.

Tolerance (flash-attention's rule, not loosened): with ``ref64`` the reference on float64 copies of the
inputs and ``ref_same`` the reference run in the kernel's dtype,
``max|ours - ref64| <= 2 * max|ref_same - ref64| + atol``, atol = 1e-5 (fp32), 1e-3 (fp16), 1e-2 (bf16).
The same rule is applied to every gradient (dx, dresidual, dweight, dbias), taken by autograd through
both outputs with random upstream gradients.
"""

import itertools

import pytest
import torch

from noisynn_kernels import NoiseConfig, quality
from noisynn_kernels.ops import cpu_mix_add_layernorm as cpu

if not cpu.available():
    pytest.skip("the compiled extension noisynn_kernels._C lacks noisynn::mix_add_layernorm_fwd_cpu "
                "(not built, or built without csrc/cpu/mix_add_layernorm.cpp)", allow_module_level=True)

from _oracle import ALPHA, AXES, KINDS, Oracle, dense_q, gen as _gen  # noqa: E402

ORACLE = Oracle(cpu.launch, "cpu")
fused, make_inputs, run_case = ORACLE.fused, ORACLE.make_inputs, ORACLE.run_case


# --------------------------------------------------------------------------------------------------
# kernel vs reference


def _main_cases():
    """kinds x axes x order x prefix 0/1/5 x D 123/192 x fp32/bf16; B 2/3, the eight residual / weight /
    bias combinations and non-contiguous inputs rotate through them."""
    flags = list(itertools.product((True, False), repeat=3))
    cases = []
    for i, (dtype, kind, axis, man, prefix, D) in enumerate(itertools.product(
            (torch.float32, torch.bfloat16), KINDS, AXES, (False, True), (0, 1, 5), (123, 192))):
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


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_fp16(kind, mix_after_norm):
    run_case(2, 1 + 16, 123, 1, kind, "tokens", mix_after_norm, torch.float16)


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
def test_optimal_large_group_recomputes(mix_after_norm):
    """A tokens group larger than the C++ group buffer (K * D > 2**21 floats): the column sum pass and the
    row pass each recompute the source rows."""
    run_case(1, 2 + 1040, 2048, 2, "optimal", "tokens", mix_after_norm, torch.float32, has_w=True)


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_straight_through(kind, mix_after_norm):
    run_case(2, 1 + 16, 123, 1, kind, "tokens", mix_after_norm, torch.float32, straight_through=True)


@pytest.mark.parametrize("use", (("normed",), ("residual_out",)))
@pytest.mark.parametrize("kind,mix_after_norm", (("optimal", False), ("shift", True)))
def test_one_output_used(use, kind, mix_after_norm):
    run_case(2, 1 + 16, 123, 1, kind, "tokens", mix_after_norm, torch.float32, use=use)


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("grid", ((1, 8), (7, 3), (4, 5)))
@pytest.mark.parametrize("B", (2, 4))
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_rows_bundles(kind, grid, B, mix_after_norm):
    """Axis rows mixes several grid columns per task: all of a sample's when that still gives 4 tasks
    per thread, else fewer.  With B = 4 one thread takes whole samples and two threads split them
    (a partial last bundle for 3 and 5 columns); with B = 2 one thread splits them and two threads go
    down to one or two columns per task.  Grid heights 1 (the identity), odd and even.  The oracle
    holds for every bundling, and each row's arithmetic does not depend on it: outputs and dx are
    bitwise the same for 1 and 2 threads."""
    N = 1 + grid[0] * grid[1]
    cfg = NoiseConfig(kind=kind, axis="rows", alpha=ALPHA, allow_batch_dependence=True,
                      matrix=dense_q(grid[0], 0) if kind == "dense" else None)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run_case(B, N, 123, 1, kind, "rows", mix_after_norm, torch.float32, grid=grid)
            t = make_inputs(B, N, 123, has_res=True, has_w=True, has_b=True, seed=3)[1](torch.float32)
            normed, res = fused(t["x"], t["residual"], t["weight"], t["bias"], mix=cfg, prefix_tokens=1,
                                grid=grid, mix_after_norm=mix_after_norm)
            (normed * torch.linspace(-1, 1, 123) + res).sum().backward()
            results.append((normed.detach(), res.detach(), t["x"].grad))
    finally:
        torch.set_num_threads(old)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_rows_bundle_larger_than_buffer(mix_after_norm):
    """A sample's whole grid exceeds the optimal group buffer (K * columns * D > 2**21 floats), so the
    bundle of columns is halved until it fits."""
    run_case(1, 1 + 32 * 32, 2100, 1, "optimal", "rows", mix_after_norm, torch.float32, grid=(32, 32))


@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("axis", ("tokens", "rows"))
def test_work_buffers_carry_nothing_between_calls(kind, axis):
    """Each thread keeps its work buffer between calls, uninitialised: a call after one on NaN inputs
    (which leaves NaN in every buffer) must give bitwise the result it gave before."""
    N, grid = 1 + 16, (4, 4)
    cfg = NoiseConfig(kind=kind, axis=axis, alpha=ALPHA, matrix=dense_q(16 if axis == "tokens" else 4, 0)
                      if kind == "dense" else None)
    t = make_inputs(3, N, 40, has_res=True, has_w=True, has_b=True, seed=4)[0]
    args = (t["x"], t["residual"], t["weight"], t["bias"])

    def call(x, r, w, b):
        with torch.no_grad():
            return fused(x, r, w, b, mix=cfg, prefix_tokens=1, grid=grid)

    before = call(*args)
    poisoned = call(torch.full((3, N, 40), float("nan")), *args[1:])
    assert torch.isnan(poisoned[1]).all()
    after = call(*args)
    for one, two in zip(before, after):
        assert torch.equal(one, two)


@pytest.mark.parametrize("threads", (1, 2))
def test_thread_count_does_not_change_results(threads):
    """dweight / dbias come from per-thread partials: any thread count gives a correct sum."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_case(4, 1 + 49, 192, 1, "shift", "rows", False, torch.float32)
        run_case(4, 1 + 49, 192, 1, "optimal", "tokens", True, torch.float32)
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------------
# registration


def _op_args(kind, axis, D=33, B=2, N=5, prefix=1, requires_grad=False):
    g = _gen(7)
    x, r = (torch.randn(B, N, D, generator=g).requires_grad_(requires_grad) for _ in range(2))
    w, b = (torch.randn(D, generator=g).requires_grad_(requires_grad) for _ in range(2))
    k = {"tokens": N - prefix, "rows": 2, "batch": B}[axis]
    M = quality.mixing_matrix("dense", k, matrix=dense_q(k)).float() if kind == "dense" else None
    grid_w = 2 if axis == "rows" else 1
    return x, r, w, b, M, prefix, grid_w


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("kind,mix_after_norm", [(k, man) for k in KINDS for man in (False, True)])
def test_opcheck(kind, mix_after_norm, axis):
    """Every opcheck test (schema, autograd registration, fake tensor, aot_dispatch static and dynamic)."""
    x, r, w, b, M, prefix, grid_w = _op_args(kind, axis, requires_grad=True)
    code, axis_code = cpu.KIND_CODES[kind], cpu.AXIS_CODES[axis]
    fwd_args = (x, r, w, b, 1e-6, code, axis_code, ALPHA, M, prefix, grid_w, mix_after_norm, False)
    torch.library.opcheck(torch.ops.noisynn.mix_add_layernorm_fwd_cpu.default, fwd_args)
    fwd_args = (x, None, None, None, 1e-6, code, axis_code, ALPHA, M, prefix, grid_w, mix_after_norm, True)
    torch.library.opcheck(torch.ops.noisynn.mix_add_layernorm_fwd_cpu.default, fwd_args)
    with torch.no_grad():
        _, res_out, mean, rstd = torch.ops.noisynn.mix_add_layernorm_fwd_cpu(
            x, r, w, b, 1e-6, code, axis_code, ALPHA, M, prefix, grid_w, mix_after_norm, False)
    dy, dres = torch.randn_like(res_out), torch.randn_like(res_out)
    for bwd_args in ((dy, dres, res_out, w.detach(), mean, rstd, code, axis_code, ALPHA, M, prefix, grid_w,
                      mix_after_norm),
                     (dy, None, res_out, None, mean, rstd, code, axis_code, ALPHA, M, prefix, grid_w,
                      mix_after_norm)):
        torch.library.opcheck(torch.ops.noisynn.mix_add_layernorm_bwd_cpu.default, bwd_args)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(3, 7, 40, dtype=torch.bfloat16)
        normed, res_out, mean, rstd = torch.ops.noisynn.mix_add_layernorm_fwd_cpu(x, None, None, None, 1e-6, 2, 0,
                                                                                   ALPHA, None, 1, 1, False, False)
        assert normed.shape == res_out.shape == (3, 7, 40) and normed.dtype == torch.bfloat16
        assert mean.shape == rstd.shape == (21,) and mean.dtype == torch.float32
        dx, dw, db = torch.ops.noisynn.mix_add_layernorm_bwd_cpu(normed, None, res_out, None, mean, rstd, 2, 0,
                                                                 ALPHA, None, 1, 1, False)
        assert dx.shape == (3, 7, 40) and dw.shape == db.shape == (40,) and dw.dtype == torch.float32


def test_op_errors():
    x = torch.randn(2, 5, 8)
    op = torch.ops.noisynn.mix_add_layernorm_fwd_cpu
    with pytest.raises(RuntimeError, match="kind code"):
        op(x, None, None, None, 1e-6, 7, 0, ALPHA, None, 0, 1, False, False)
    with pytest.raises(RuntimeError, match="needs mix_matrix"):
        op(x, None, None, None, 1e-6, 3, 0, ALPHA, None, 0, 1, False, False)
    with pytest.raises(RuntimeError, match="grid_w"):
        op(x, None, None, None, 1e-6, 1, 1, ALPHA, None, 0, 3, False, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(x.double(), None, None, None, 1e-6, 1, 0, ALPHA, None, 0, 1, False, False)


def test_build_info_lists_kernel():
    from noisynn_kernels._ext import extension
    assert "mix_add_layernorm" in extension().build_info()["cpu_kernels"]


# --------------------------------------------------------------------------------------------------
# instruction sets, huge-page outputs, autograd plumbing

def _isa_env(**extra):
    import os
    env = dict(os.environ)
    env.update(extra)
    return env


def test_build_info_reports_the_instruction_set():
    import os
    from noisynn_kernels._ext import extension
    info = extension().build_info()
    assert info["cpu_hugepage_outputs"] is (os.environ.get("NOISYNN_CPU_HUGEPAGES") == "1")
    assert info["cpu_isas"][0] == "default"
    assert set(info["cpu_isas"]) <= {"default", "avx2"}
    assert info["cpu_isa"] in info["cpu_isas"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and "avx2" in info["cpu_isas"]:
        assert info["cpu_isa"] == "avx2"


def test_baseline_instruction_set_matches_reference():
    """ATEN_CPU_CAPABILITY=default selects the baseline build of the kernels (the one machines without AVX2
    run); the oracle tests of this file must pass on it too, in a fresh process."""
    import subprocess
    import sys
    env = _isa_env(ATEN_CPU_CAPABILITY="default")
    isa = subprocess.run([sys.executable, "-c", "from noisynn_kernels._ext import extension; "
                          "print(extension().build_info()['cpu_isa'])"], env=env, capture_output=True, text=True)
    assert isa.returncode == 0, isa.stderr
    assert isa.stdout.strip() == "default"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                          "test_matches_reference or test_odd_sizes or test_fp16 or test_straight_through"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


def test_instruction_sets_agree():
    """Both builds add in the same order (8-lane vector extensions); they may differ only by FMA contraction."""
    import subprocess
    import sys
    B, N, D = 3, 1 + 16, 200
    t = make_inputs(B, N, D, has_res=True, has_w=True, has_b=True, seed=5)[1](torch.float32)
    cfg = NoiseConfig(kind="optimal", axis="rows")
    normed, res = fused(t["x"].detach(), t["residual"].detach(), t["weight"].detach(), t["bias"].detach(),
                        mix=cfg, prefix_tokens=1, grid=(4, 4))
    code = ("import sys, torch\n"
            "from noisynn_kernels import NoiseConfig\n"
            "from noisynn_kernels.functional import check_mix_add_layernorm\n"
            "from noisynn_kernels.ops import cpu_mix_add_layernorm as cpu\n"
            "x, r, w, b = torch.load(sys.argv[1])\n"
            "cfg = NoiseConfig(kind='optimal', axis='rows')\n"
            "spec = check_mix_add_layernorm(x, r, w, b, 1e-6, cfg, 1, (4, 4), False)\n"
            "torch.save(cpu.launch(x, r, w, b, 1e-6, spec, False), sys.argv[2])\n")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        torch.save(tuple(t[k].detach() for k in ("x", "residual", "weight", "bias")), f"{d}/in.pt")
        run = subprocess.run([sys.executable, "-c", code, f"{d}/in.pt", f"{d}/out.pt"],
                             env=_isa_env(ATEN_CPU_CAPABILITY="default"), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        normed_default, res_default = torch.load(f"{d}/out.pt")
    torch.testing.assert_close(res_default, res, rtol=0, atol=4e-6)
    torch.testing.assert_close(normed_default, normed, rtol=0, atol=4e-5)


def test_hugepage_advice_changes_no_data():
    """With NOISYNN_CPU_HUGEPAGES=1 outputs of >= 4 MiB get madvise(MADV_HUGEPAGE) (a hint; off by default).
    The results must be bitwise the same either way."""
    import subprocess
    import sys
    import tempfile
    B, N, D = 8, 1 + 196, 768  # 4.8 MB per output
    g = _gen(11)
    x, r = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    cfg = NoiseConfig(kind="shift", axis="tokens")
    x.requires_grad_()
    normed, res = fused(x, r, None, None, mix=cfg, prefix_tokens=1)
    (dx,) = torch.autograd.grad(normed, x, torch.ones_like(normed))
    code = ("import sys, torch\n"
            "from noisynn_kernels import NoiseConfig\n"
            "from noisynn_kernels._ext import extension\n"
            "from noisynn_kernels.functional import check_mix_add_layernorm\n"
            "from noisynn_kernels.ops import cpu_mix_add_layernorm as cpu\n"
            "assert extension().build_info()['cpu_hugepage_outputs'] is True\n"
            "x, r = torch.load(sys.argv[1]); x.requires_grad_()\n"
            "spec = check_mix_add_layernorm(x, r, None, None, 1e-6, NoiseConfig(kind='shift'), 1, None, False)\n"
            "normed, res = cpu.launch(x, r, None, None, 1e-6, spec, False)\n"
            "(dx,) = torch.autograd.grad(normed, x, torch.ones_like(normed))\n"
            "torch.save((normed.detach(), res.detach(), dx), sys.argv[2])\n")
    with tempfile.TemporaryDirectory() as d:
        torch.save((x.detach(), r), f"{d}/in.pt")
        run = subprocess.run([sys.executable, "-c", code, f"{d}/in.pt", f"{d}/out.pt"],
                             env=_isa_env(NOISYNN_CPU_HUGEPAGES="1"), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        normed_on, res_on, dx_on = torch.load(f"{d}/out.pt")
    assert torch.equal(normed_on, normed.detach()) and torch.equal(res_on, res.detach()) and torch.equal(dx_on, dx)


def test_unused_residual_out_gets_no_zero_gradient():
    """Only ``normed`` used: the backward op receives ``d_residual_out=None`` (no zero-filled B x N x D tensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "mix_add_layernorm_bwd_cpu" in str(func):
                seen.append(args[1])
            if func in (torch.ops.aten.zeros_like.default, torch.ops.aten.fill_.Scalar, torch.ops.aten.zero_.default):
                if args[0].numel() >= 2 * 5 * 16:
                    seen.append(("zero-fill", tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 5, 16, requires_grad=True)
    r = torch.randn(2, 5, 16, requires_grad=True)
    normed, _ = fused(x, r, None, None, mix=NoiseConfig(kind="optimal"), prefix_tokens=1)
    with Record():
        normed.backward(torch.randn_like(normed))
    assert seen == [None], seen


def test_x_and_residual_gradients_are_independent():
    """x and residual receive the same gradient values; autograd hands each leaf its own tensor."""
    x = torch.randn(2, 5, 16, requires_grad=True)
    r = torch.randn(2, 5, 16, requires_grad=True)
    normed, res = fused(x, r, None, None, mix=NoiseConfig(kind="shift"), prefix_tokens=1)
    (normed.sum() + res.pow(2).sum()).backward()
    assert torch.equal(x.grad, r.grad)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    before = r.grad.clone()
    x.grad.add_(1.0)
    assert torch.equal(r.grad, before)
