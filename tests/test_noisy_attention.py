"""noisynn_kernels.noisy_attention on its backends vs the oracle :func:`noisynn_kernels.reference.noisy_attention`.

The backends (the ``backend`` fixture, tests/_backends.py): ``reference`` (``F.scaled_dot_product_attention``
then the reference mix) and ``triton`` (``noisynn::noisy_attention_fwd/bwd``: on a GPU, or on the CPU in Triton's
interpreter, which has no bf16, so shapes stay small).  The tests of the Triton ops themselves (registration,
torch.compile, output layout, speed) run on ``triton`` only; those that need compiled kernels skip under the
interpreter.

Tolerance: the oracle's rule (tests/_oracle.py), for ``y`` and for dq, dk, dv (autograd with a random upstream
gradient).
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from _backends import backend_param, backends
from _oracle import ALPHA, ATOL, AXES, KINDS, check, dense_q, gen, make_config, mixed_k

from noisynn_kernels import NoiseConfig, quality, reference
from noisynn_kernels._op_codes import AXIS_CODES, KIND_CODES
from noisynn_kernels.errors import BackendUnavailableError, ConfigError, QualityMatrixError, ShapeError
from noisynn_kernels.functional import backend_for, noisy_attention

#: The backends of the op.
ALL = ("reference", "triton")


def _ops():
    """``(fwd, bwd)``: the Triton ops (importing their module registers them)."""
    importlib.import_module("noisynn_kernels.ops.noisy_attention.triton")
    return torch.ops.noisynn.noisy_attention_fwd, torch.ops.noisynn.noisy_attention_bwd


# --------------------------------------------------------------------------------------------------
# helpers


class Inputs:
    """fp32 master values of q, k, v (drawn on CPU) and an upstream gradient; ``leaves`` gives fresh leaves
    in one dtype, either contiguous or as the strided views of a fused ``(B, N, 3, H, Dh)`` qkv tensor."""

    def __init__(self, B, H, N, Dh, seed=0):
        g = gen(seed)
        self.qkv = torch.randn(B, N, 3, H, Dh, generator=g)
        self.gy = torch.randn(B, H, N, Dh, generator=g)

    def leaves(self, dtype, device, fused=False):
        """``(params, (q, k, v))``: the tensors gradients are taken for, and q, k, v."""
        if fused:
            qkv = self.qkv.to(device=device, dtype=dtype).requires_grad_()
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            assert not q.is_contiguous()
            return [qkv], (q, k, v)
        q, k, v = (self.qkv[:, :, i].transpose(1, 2).contiguous().to(device=device, dtype=dtype).requires_grad_()
                   for i in range(3))
        return [q, k, v], (q, k, v)


def oracle(qkv, cfg, prefix, grid, scale=None):
    q, k, v = qkv
    M = None
    if cfg.kind == "dense":
        M = quality.mixing_matrix("dense", mixed_k(q.shape[0], q.shape[2], cfg.axis, prefix, grid), matrix=cfg.matrix)
    return reference.noisy_attention(q, k, v, scale=scale, kind=cfg.kind, axis=cfg.axis, alpha=cfg.alpha, M=M,
                                     prefix_tokens=prefix, grid=grid, straight_through=cfg.straight_through,
                                     shift=cfg.shift)


def grads(params, out, gy):
    return torch.autograd.grad((out * gy.to(device=out.device, dtype=out.dtype)).sum(), params)


def run_case(backend, B, H, N, Dh, prefix, kind, axis, dtype, *, grid=None, fused=False, straight_through=False,
             scale=None, seed=0, backward=True, shift=1):
    """One case on ``backend``: ``y`` and (``backward``) dq, dk, dv against the fp64 oracle on the CPU, by the
    tolerance rule."""
    backend.skip_unless(dtype)
    if axis == "rows" and grid is None:
        side = math.isqrt(N - prefix)
        grid = (side, side)
    cfg = make_config(kind, axis, mixed_k(B, N, axis, prefix, grid), seed=seed, straight_through=straight_through,
                      shift=shift)
    inp = Inputs(B, H, N, Dh, seed)
    params, qkv = inp.leaves(dtype, backend.device, fused=fused)
    y = noisy_attention(*qkv, mix=cfg, scale=scale, prefix_tokens=prefix, grid=grid if axis == "rows" else None,
                        backend=backend.name)
    assert y.dtype == dtype and y.shape == (B, H, N, Dh)
    p64, qkv64 = inp.leaves(torch.float64, "cpu", fused=fused)
    ps, qkvs = inp.leaves(dtype, "cpu", fused=fused)
    ref64, refs = oracle(qkv64, cfg, prefix, grid, scale), oracle(qkvs, cfg, prefix, grid, scale)
    check(y.cpu(), ref64, refs, ATOL[dtype], "y")
    if not backward:
        return
    g, g64, gs = grads(params, y, inp.gy), grads(p64, ref64, inp.gy), grads(ps, refs, inp.gy)
    for name, a, b, c in zip(("dqkv",) if fused else ("dq", "dk", "dv"), g, g64, gs):
        assert a.dtype == dtype
        check(a.cpu(), b, c, ATOL[dtype], name)


# --------------------------------------------------------------------------------------------------
# kernel vs reference


def _main_cases():
    """Every kind x axis x prefix (0, 1) in fp32 and fp16, forward and backward.  Head dim 32 / 80 (80: a
    padded 128 block) and contiguous / fused-qkv strided inputs rotate through them; N is odd or leaves an odd
    patch count, and spans two tiles (the interpreter's tiles are 32 rows; 64 / 128 on a GPU)."""
    cases = []
    i = 0
    for dtype in (torch.float32, torch.float16):
        for kind in KINDS:
            for axis in AXES:
                for prefix in (0, 1):
                    Dh = (32, 80)[(i // 2) % 2]
                    fused = i % 3 == 2
                    N = prefix + (49 if axis == "rows" else 50)
                    cases.append(pytest.param(N, Dh, prefix, kind, axis, dtype, fused,
                                              id=f"{str(dtype)[6:]}-{kind}-{axis}-P{prefix}-N{N}-Dh{Dh}"
                                                 f"{'-qkv' if fused else ''}"))
                    i += 1
    return cases


@pytest.mark.parametrize("backend,N,Dh,prefix,kind,axis,dtype,fused",
                         [backend_param(name, *case.values, id=case.id) for name in ALL for case in _main_cases()],
                         indirect=["backend"])
def test_matches_reference(backend, N, Dh, prefix, kind, axis, dtype, fused):
    run_case(backend, 2, 2, N, Dh, prefix, kind, axis, dtype, fused=fused)


@backends(*ALL)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("straight_through", (False, True))
def test_shift_direction(backend, axis, straight_through):
    """``shift=-1`` (query row ``i`` reads row ``i + 1``): output and dq, dk, dv against the reference; N spans
    two tiles, so the partner of a tile's last row lies in the next tile."""
    run_case(backend, 3, 2, 1 + 49, 32, 1, "shift", axis, torch.float32, shift=-1, straight_through=straight_through)


@backends(*ALL)
def test_shift_direction_formula(backend):
    """Stated as a formula: with ``shift=-1`` on the tokens axis, patch token ``n`` of the output is
    ``(1 - a) o_n + a o_{n+1}`` (cyclic over the patch tokens) of the unmixed attention output ``o``."""
    B, H, N, Dh, a = 2, 2, 1 + 9, 16, 0.25
    q, k, v = (torch.randn(B, H, N, Dh, generator=gen(30 + i)).to(backend.device) for i in range(3))
    cfg = NoiseConfig(kind="shift", alpha=a, shift=-1, axis="tokens")
    y = noisy_attention(q, k, v, mix=cfg, prefix_tokens=1, backend=backend.name).cpu()
    o = F.scaled_dot_product_attention(q, k, v).cpu()
    nxt = torch.cat([o[:, :, 2:], o[:, :, 1:2]], dim=2)  # patch token n + 1, wrapping to the first patch token
    torch.testing.assert_close(y[:, :, 1:], (1 - a) * o[:, :, 1:] + a * nxt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y[:, :, :1], o[:, :, :1], rtol=1e-4, atol=1e-5)


@backends(*ALL)
@pytest.mark.parametrize("kind,axis,Dh", [("optimal", "rows", 64), ("shift", "tokens", 80), ("optimal", "tokens", 128),
                                          ("shift", "rows", 32)])
def test_vit_token_count(backend, kind, axis, Dh):
    """N = 197 (1 + 14 x 14): several tiles with a ragged last one; the optimal column partials and the shift
    halo cross tile boundaries."""
    run_case(backend, 1, 2, 197, Dh, 1, kind, axis, torch.float32)


@backends(*ALL)
@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("grid", ((5, 10), (10, 5)))
def test_non_square_grid(backend, kind, grid):
    run_case(backend, 2, 1, 1 + 50, 32, 1, kind, "rows", torch.float32, grid=grid)


@backends(*ALL)
@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
@pytest.mark.parametrize("B", (1, 3))
def test_batch_sizes(backend, kind, B):
    """Batch axis with k = 1 (the identity) and k = 3 (odd)."""
    run_case(backend, B, 2, 1 + 20, 32, 1, kind, "batch", torch.float32)


@backends(*ALL)
@pytest.mark.parametrize("kind", ("shift", "optimal", "dense"))
def test_straight_through(backend, kind):
    """Forward M o, gradient that of plain attention (the reference's o + (M o - o).detach())."""
    run_case(backend, 2, 2, 1 + 24, 32, 1, kind, "tokens", torch.float32, straight_through=True)


@backends(*ALL)
def test_custom_scale(backend):
    run_case(backend, 2, 2, 1 + 24, 32, 1, "optimal", "tokens", torch.float32, scale=0.37)


@backends(*ALL)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_no_mix_matches_sdpa(backend, dtype):
    """mix=None is plain attention: judged against fp64 with SDPA in the same dtype as the yardstick, forward
    and backward."""
    inp = Inputs(2, 3, 45, 64, seed=3)
    params, qkv = inp.leaves(dtype, backend.device)
    y = noisy_attention(*qkv, backend=backend.name)
    p64, qkv64 = inp.leaves(torch.float64, "cpu")
    ps, qkvs = inp.leaves(dtype, "cpu")
    ref64, refs = F.scaled_dot_product_attention(*qkv64), F.scaled_dot_product_attention(*qkvs)
    check(y.cpu(), ref64, refs, ATOL[dtype], "y")
    for name, a, b, c in zip(("dq", "dk", "dv"), grads(params, y, inp.gy), grads(p64, ref64, inp.gy),
                             grads(ps, refs, inp.gy)):
        check(a.cpu(), b, c, ATOL[dtype], name)


@backends(*ALL)
def test_mix_coercion(backend):
    """mix takes what NoiseConfig.coerce takes: a kind name (default axis tokens) or a dict of fields."""
    inp = Inputs(2, 2, 1 + 16, 32)
    _, qkv = inp.leaves(torch.float32, backend.device)
    a = noisy_attention(*qkv, mix="optimal", prefix_tokens=1, backend=backend.name)
    b = noisy_attention(*qkv, mix={"kind": "optimal", "axis": "tokens"}, prefix_tokens=1, backend=backend.name)
    c = noisy_attention(*qkv, mix=NoiseConfig(kind="optimal"), prefix_tokens=1, backend=backend.name)
    assert torch.equal(a, b) and torch.equal(a, c)


@backends(*ALL)
def test_prefix_tokens_are_not_mixed(backend):
    inp = Inputs(2, 2, 3 + 16, 32)
    _, qkv = inp.leaves(torch.float32, backend.device)
    plain = noisy_attention(*qkv, backend=backend.name)
    noisy = noisy_attention(*qkv, mix=make_config("optimal", "tokens", 16), prefix_tokens=3, backend=backend.name)
    torch.testing.assert_close(noisy[:, :, :3], plain[:, :, :3])
    assert not torch.allclose(noisy[:, :, 3:], plain[:, :, 3:])


@backends(*ALL)
@pytest.mark.parametrize("kind,axis", [("optimal", "batch"), ("shift", "rows"), ("dense", "tokens")])
def test_deterministic(backend, kind, axis):
    """Two runs give bitwise-equal outputs and gradients (the Triton kernels use no atomics anywhere)."""
    B, H, N, prefix = 2, 2, 1 + 36, 1
    cfg = make_config(kind, axis, mixed_k(B, N, axis, prefix, (6, 6)))
    inp = Inputs(B, H, N, 32)
    runs = []
    for _ in range(2):
        params, qkv = inp.leaves(torch.float32, backend.device)
        y = noisy_attention(*qkv, mix=cfg, prefix_tokens=prefix, backend=backend.name)
        runs.append((y.detach(),) + grads(params, y, inp.gy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@backends("triton")
def test_output_layout_and_reference_backend(backend):
    """The triton output is a (B, H, N, Dh) view of a (B, N, H, Dh) buffer (free reshape for the projection);
    the reference backend computes the same values through SDPA."""
    inp = Inputs(2, 2, 1 + 16, 32)
    _, qkv = inp.leaves(torch.float32, backend.device)
    cfg = make_config("shift", "rows", 4)
    y = noisy_attention(*qkv, mix=cfg, prefix_tokens=1, backend="triton")
    assert y.transpose(1, 2).is_contiguous()
    r = noisy_attention(*(t.cpu() for t in qkv), mix=cfg, prefix_tokens=1, backend="reference")
    torch.testing.assert_close(y.cpu(), r, atol=1e-5, rtol=1e-5)


@backends("reference")
def test_reference_backend_gradients_match_oracle(backend):
    """The reference path (SDPA + reference mix) is what models run on CPU: in fp64 it is the oracle."""
    inp = Inputs(2, 2, 1 + 16, 32)
    cfg = make_config("dense", "batch", 2)
    params, qkv = inp.leaves(torch.float64, "cpu")
    p2, qkv2 = inp.leaves(torch.float64, "cpu")
    y = noisy_attention(*qkv, mix=cfg, prefix_tokens=1, backend="reference")
    r = oracle(qkv2, cfg, 1, None)
    torch.testing.assert_close(y, r)
    for a, b in zip(grads(params, y, inp.gy), grads(p2, r, inp.gy)):
        torch.testing.assert_close(a, b)


def test_automatic_backend_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("NOISYNN_BACKEND", raising=False)
    assert backend_for("noisy_attention", "cpu") == "reference"
    for name in ("cpu", "cuda"):
        with pytest.raises(BackendUnavailableError, match="no noisy_attention kernels"):
            noisy_attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)), backend=name)
    # NOISYNN_BACKEND is a preference: the ops without that backend ignore it
    monkeypatch.setenv("NOISYNN_BACKEND", "cpu")
    assert backend_for("noisy_attention", "cpu") == "reference"
    q = torch.randn(1, 1, 4, 8)
    torch.testing.assert_close(noisy_attention(q, q, q), F.scaled_dot_product_attention(q, q, q))


# --------------------------------------------------------------------------------------------------
# registration


def _op_args(kind, axis, device, B=2, H=2, N=1 + 16, Dh=32, prefix=1, requires_grad=False, shift=1):
    g = gen(7)
    q, k, v = (torch.randn(B, H, N, Dh, generator=g).to(device).requires_grad_(requires_grad) for _ in range(3))
    K = mixed_k(B, N, axis, prefix, (4, 4))
    M = quality.mixing_matrix("dense", K, matrix=dense_q(K)).float().to(device) if kind == "dense" else None
    grid_w = 4 if axis == "rows" else 1
    return (q, k, v, Dh ** -0.5, KIND_CODES[kind], AXIS_CODES[axis], ALPHA, shift, M, prefix, grid_w)


# test_aot_dispatch_* cannot run in the interpreter (wrap_triton returns a bare InterpretedFunction there, which
# then runs on FakeTensors); they run on a GPU.
INTERPRETER_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")
#: The (kind, axis) pairs opcheck runs under the interpreter (every pair on a GPU).
INTERPRETER_OPCHECK_CASES = (("identity", "tokens"), ("optimal", "rows"), ("shift", "batch"), ("dense", "tokens"))


@backends("triton")
@pytest.mark.parametrize("kind,axis", [(k, a) for k in KINDS for a in AXES])
def test_opcheck(backend, kind, axis):
    """Every opcheck test (schema, autograd registration, fake tensor, aot_dispatch static and dynamic); under
    Triton's interpreter the first three, on four (kind, axis) pairs."""
    kw = {}
    if backend.interpreted:
        if (kind, axis) not in INTERPRETER_OPCHECK_CASES:
            pytest.skip(f"Triton's interpreter is slow: its opcheck runs on {INTERPRETER_OPCHECK_CASES} "
                        "(every pair on a GPU)")
        kw = {"test_utils": INTERPRETER_OPCHECK}
    fwd, bwd = _ops()
    args = _op_args(kind, axis, backend.device, requires_grad=True, shift=-1 if kind == "shift" else 1)
    fwd_args = args + (False,)
    torch.library.opcheck(fwd.default, fwd_args, **kw)
    with torch.no_grad():
        y, o, lse = fwd(*fwd_args)
    q, k, v = (t.detach() for t in args[:3])
    saved_o = y if kind == "identity" else o
    bwd_args = (torch.randn_like(y), q, k, v, saved_o, lse) + args[3:]
    torch.library.opcheck(bwd.default, bwd_args, **kw)


@backends("triton")
def test_fake_shapes(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    fwd, bwd = _ops()
    with FakeTensorMode():
        q = torch.empty(3, 4, 17, 80, dtype=torch.float16, device=backend.device)
        y, o, lse = fwd(q, q, q, 0.1, KIND_CODES["optimal"], 0, ALPHA, 1, None, 1, 1, False)
        assert y.shape == o.shape == (3, 4, 17, 80) and y.dtype == torch.float16
        assert y.stride() == (17 * 4 * 80, 80, 4 * 80, 1)
        assert lse.shape == (3, 4, 17) and lse.dtype == torch.float32
        y, o, lse = fwd(q, q, q, 0.1, KIND_CODES["identity"], 0, ALPHA, 1, None, 1, 1, False)
        assert o.numel() == 0
        dq, dk, dv = bwd(y, q, q, q, y, lse, 0.1, 0, 0, ALPHA, 1, None, 1, 1)
        assert dq.shape == dk.shape == dv.shape == (3, 4, 17, 80)


@backends("triton")
def test_dynamo_keeps_the_op(backend):
    """Dynamo traces the checked entry point with fullgraph=True and keeps the custom op in its graph (no silent
    bypass).  The recording backend runs that graph eagerly, so this runs on CPU; Inductor needs a GPU."""
    B, H, N, prefix = 2, 2, 1 + 16, 1
    cfg = make_config("optimal", "tokens", N - prefix)
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    def f(q, k, v):
        return noisy_attention(q, k, v, mix=cfg, prefix_tokens=prefix, backend="triton")

    torch._dynamo.reset()
    inp = Inputs(B, H, N, 32)
    pe, qkv_e = inp.leaves(torch.float32, backend.device)
    pc, qkv_c = inp.leaves(torch.float32, backend.device)
    eager = f(*qkv_e)
    comp = torch.compile(f, backend=recording_backend, fullgraph=True)(*qkv_c)
    assert torch.ops.noisynn.noisy_attention_fwd.default in targets, "the compiled graph bypassed the op"
    torch.testing.assert_close(comp, eager)
    for a, b in zip(grads(pc, comp, inp.gy), grads(pe, eager, inp.gy)):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# argument checking


@backends(*ALL)
def test_errors(backend):
    """The package's checks, the same on every backend."""
    q = torch.randn(2, 2, 5, 8, device=backend.device)

    def call(*args, **kw):
        return noisy_attention(*args, backend=backend.name, **kw)

    with pytest.raises(ShapeError, match=r"\(B, H, N, Dh\).*rank 3"):
        call(q[0], q[0], q[0])
    with pytest.raises(ShapeError, match="k has shape"):
        call(q, q[:, :, :4], q)
    with pytest.raises(ShapeError, match="v has dtype"):
        call(q, q, q.double())
    with pytest.raises(ShapeError, match="floating-point"):
        call(q.long(), q.long(), q.long())
    with pytest.raises(ShapeError, match="empty"):
        call(q[:, :0], q[:, :0], q[:, :0])
    with pytest.raises(ShapeError, match="must be a torch.Tensor"):
        call(q, None, q)
    with pytest.raises(ConfigError, match="scale"):
        call(q, q, q, scale=float("nan"))
    with pytest.raises(ConfigError, match="prefix_tokens must be an int"):
        call(q, q, q, prefix_tokens=-1)
    with pytest.raises(ShapeError, match="prefix_tokens = 5 leaves no patch tokens"):
        call(q, q, q, prefix_tokens=5)
    with pytest.raises(ConfigError, match="linear transform noise"):
        call(q, q, q, mix=NoiseConfig(kind="gaussian"))
    with pytest.raises(ShapeError, match="not a square"):
        call(q, q, q, mix=NoiseConfig(kind="shift", axis="rows"))
    with pytest.raises(ShapeError, match="does not match"):
        call(q, q, q, mix=NoiseConfig(kind="shift", axis="rows"), prefix_tokens=1, grid=(3, 2))
    with pytest.raises(ShapeError, match=r"expected \(4, 4\)"):
        call(q, q, q, mix=NoiseConfig(kind="dense", matrix=dense_q(3)), prefix_tokens=1)
    with pytest.raises(QualityMatrixError, match="not invertible"):
        call(q, q, q, mix=NoiseConfig(kind="shift", alpha=0.5), prefix_tokens=1)


@backends("triton")
def test_triton_limits(backend):
    """The Triton kernels' own limits: their dtypes, Dh <= 128, a dense matrix that is a constant; Triton's
    interpreter has no bfloat16."""
    q = torch.randn(2, 2, 5, 8, device=backend.device)
    with pytest.raises(ShapeError, match="dtype torch.float64"):
        noisy_attention(q.double(), q.double(), q.double(), backend="triton")
    big = torch.randn(1, 1, 4, 160, device=backend.device)
    with pytest.raises(ShapeError, match=r"Dh = 160 is too large"):
        noisy_attention(big, big, big, backend="triton")
    with pytest.raises(ConfigError, match="requires grad"):
        noisy_attention(q, q, q, mix=NoiseConfig(kind="dense", matrix=dense_q(4).requires_grad_()), prefix_tokens=1,
                        backend="triton")
    if backend.interpreted:
        qb = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
        with pytest.raises(BackendUnavailableError, match="bfloat16"):
            noisy_attention(qb, qb, qb, backend="triton")


# --------------------------------------------------------------------------------------------------
# benchmark


def test_bench_attention_rows():
    """The benchmark runs on CPU with the reference path, and never times the Triton interpreter."""
    from noisynn_kernels.bench.attention import bench_attention

    rows = bench_attention("cpu", torch.float32, shapes=[(2, 2, 17, 16)], warmup=0, iters=2, kinds=("optimal",),
                           axes=("tokens", "rows"), modes=("forward", "forward+backward"))
    assert len(rows) == 4
    for row in rows:
        assert row["op"] == "noisy_attention" and row["backend"] == "reference"
        assert set(row["competitors"]) == {"noisynn", "eager", "sdpa"}
        assert row["competitors"]["noisynn"]["speedup_vs"].keys() == {"eager", "sdpa"}
    rows = bench_attention("cpu", torch.float32, shapes=[(1, 1, 5, 16)], warmup=0, iters=1, kinds=("shift",),
                           modes=("forward",), backend="triton")
    assert "noisynn" not in rows[0]["competitors"] and "interpreter" in rows[0]["skipped"]["noisynn"]




# --------------------------------------------------------------------------------------------------
# larger shapes and compiled kernels (GPU)


@backends(*ALL)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
def test_bf16_matches_reference(backend, kind, axis):
    run_case(backend, 2, 3, 1 + 196, 64, 1, kind, axis, torch.bfloat16, fused=True)


@backends("triton")
@pytest.mark.parametrize("Dh", (32, 64, 80, 128))
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
def test_head_dims(backend, Dh, dtype):
    """Every head-dim block at N = 197 with the compiled kernels' tiles."""
    backend.skip_if_interpreted("too slow there; test_vit_token_count runs N = 197 under the interpreter")
    run_case(backend, 2, 4, 1 + 196, Dh, 1, "optimal", "rows", dtype)


@pytest.mark.gpu
@backends("triton")
@pytest.mark.parametrize("kind,axis", [("optimal", "tokens"), ("shift", "rows"), ("dense", "batch")])
def test_torch_compile(backend, kind, axis):
    """torch.compile (Inductor, fullgraph) keeps the op and matches eager in fp16, forward and backward."""
    backend.skip_if_interpreted("Inductor's lowering of a Triton op needs compiled kernels (a GPU)")
    B, H, N, prefix = 3, 4, 1 + 196, 1
    cfg = make_config(kind, axis, mixed_k(B, N, axis, prefix, (14, 14)))

    def f(q, k, v):
        return noisy_attention(q, k, v, mix=cfg, prefix_tokens=prefix)

    torch._dynamo.reset()
    inp = Inputs(B, H, N, 64)
    pe, qkv_e = inp.leaves(torch.float16, backend.device, fused=True)
    pc, qkv_c = inp.leaves(torch.float16, backend.device, fused=True)
    eager = f(*qkv_e)
    comp = torch.compile(f, fullgraph=True)(*qkv_c)
    torch.testing.assert_close(comp, eager, atol=1e-3, rtol=1e-3)
    for a, b in zip(grads(pc, comp, inp.gy), grads(pe, eager, inp.gy)):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-3)


@pytest.mark.gpu
@backends("triton")
def test_speed_vs_sdpa_and_eager_mix(backend):
    """At ViT-B/16 shape in fp16 the fused op is not slower than SDPA followed by the public-code (dense) mix,
    and within about 3x of SDPA alone (ratios measured interleaved).  Loose bounds: they catch a pathological
    kernel, not a few percent."""
    backend.skip_if_interpreted("timing the interpreter means nothing (a GPU)")
    from noisynn_kernels.bench.attention import bench_attention

    rows = bench_attention("cuda", torch.float16, shapes=[(64, 12, 197, 64)], warmup=5, iters=30,
                           kinds=("optimal",), axes=("tokens",), modes=("forward",))
    c = rows[0]["competitors"]["noisynn"]["speedup_vs"]
    assert c["eager"] > 0.9, rows[0]
    assert c["sdpa"] > 0.3, rows[0]
