"""Bugs a real GPU would hit that the Triton interpreter hides, each checked here where it can be (the
launch logic on CPU) and on a GPU where only one can (tests marked ``gpu``):

- launch grids put batch x heads on axis 0 (CUDA caps axes 1 and 2 at 65535);
- every Triton op launches under its input's device (``device_guard``);
- a dense matrix is built and checked once on the host, then cached on the device (no host sync per
  call; CUDA-graph capture works);
- empty inputs to the Triton LayerNorm ops launch nothing (no division by zero);
- under autocast ``noisy_attention`` casts its inputs as SDPA does (``qk_norm`` models);
- launch configurations sized for a GPU: fp32 attention follows PyTorch's fp32 matmul precision (``ieee``
  by default), the LayerNorm backward fills the GPU by occupancy, its column sums split long groups (the
  resource use of each variant is checked by `noisynn kernels`, tests/test_kernel_report.py).
"""

import ast
import math
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import noisynn_kernels as nk
from noisynn_kernels import quality
from noisynn_kernels._ext import backend_status
from noisynn_kernels.ops import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = backend_status("triton", DEVICE) is None
needs_triton = pytest.mark.skipif(not TRITON, reason=f"Triton cannot run on {DEVICE} here")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------------------------------
# grids


@needs_triton
def test_attention_grids_put_batch_times_heads_on_axis_0(monkeypatch):
    from noisynn_kernels.ops.noisy_attention import triton as op

    grids = []
    real = op.wrap_triton

    def recording(kernel):
        launcher = real(kernel)

        class Recorder:
            def __getitem__(self, grid):
                grids.append((kernel.__name__ if hasattr(kernel, "__name__") else str(kernel), tuple(grid)))
                return launcher[grid]

        return Recorder()

    monkeypatch.setattr(op, "wrap_triton", recording)
    B, H, N, Dh = 2, 3, 1 + 16, 16
    q, k, v = (torch.randn(B, H, N, Dh, device=DEVICE, requires_grad=True) for _ in range(3))
    for kind, axis in (("optimal", "tokens"), ("shift", "rows"), ("optimal", "batch")):
        y = nk.noisy_attention(q, k, v, mix=nk.NoiseConfig(kind=kind, axis=axis, allow_batch_dependence=True),
                               prefix_tokens=1, backend="triton")
        y.sum().backward()
    per_head = [g for name, g in grids if "group_sum" not in name]
    assert len(per_head) >= 3 * 4  # attention fwd, mix, dk/dv and dq, per case
    assert all(len(g) == 2 and g[0] == B * H for g in per_head), grids


def test_attention_grid_has_room_for_large_batches():
    pytest.importorskip("triton")
    from noisynn_kernels.ops.noisy_attention import triton as op

    bh, tiles = op._grid(6000 * 12, 4)  # ViT-B at batch 6000: 72000 programs per tile row
    assert bh == 72000 and tiles == 4 and tiles <= op.MAX_GRID_YZ
    with pytest.raises(nk.ShapeError, match="grid limit"):
        op._grid(1, op.MAX_GRID_YZ + 1)


# --------------------------------------------------------------------------------------------------
# device guard


def _triton_op_bodies():
    for rel in ("mix_add_layernorm", "noisy_attention", "random_noise"):
        path = os.path.join(ROOT, "noisynn_kernels", "ops", rel, "triton.py")
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and getattr(d.func, "id", "") == "triton_op" for d in node.decorator_list):
                yield rel, node


def test_every_triton_op_launches_under_its_inputs_device():
    ops = list(_triton_op_bodies())
    assert len(ops) == 7
    for rel, fn in ops:
        body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        assert len(body) == 1 and isinstance(body[0], ast.With), f"{rel}.{fn.name}: body is not one `with` block"
        call = body[0].items[0].context_expr
        assert isinstance(call, ast.Call) and call.func.id == "device_guard", f"{rel}.{fn.name}"


def test_device_guard_sets_the_inputs_device():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        t = torch.empty(2, device="cuda:1")
    guard = common.device_guard(t)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(common.device_guard(torch.empty(2)), torch.cuda.device)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_ops_run_on_the_second_gpu_while_the_first_is_current(backend):
    if backend_status(backend, "cuda") is not None:
        pytest.skip(backend_status(backend, "cuda"))
    torch.cuda.set_device(0)
    x = torch.randn(4, 17, 64, device="cuda:1")
    cfg = nk.NoiseConfig(kind="optimal")
    got = nk.mix_add_layernorm(x, x, mix=cfg, prefix_tokens=1, backend=backend)
    ref = nk.mix_add_layernorm(x.cpu(), x.cpu(), mix=cfg, prefix_tokens=1, backend="reference")
    for a, b in zip(got, ref):
        assert a.device == x.device
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# the dense matrix: checked once on the host, cached on the device


def _dense(k, scale=0.02):
    q = torch.rand(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) * scale
    return nk.NoiseConfig(kind="dense", matrix=q)


def test_dense_matrix_is_built_once_and_follows_in_place_changes(monkeypatch):
    cfg = _dense(16)
    builds = []
    real = quality.mixing_matrix
    monkeypatch.setattr(quality, "mixing_matrix", lambda *a, **kw: builds.append(a) or real(*a, **kw))
    x = torch.randn(2, 17, 8)
    first = nk.mix_add_layernorm(x, mix=cfg, prefix_tokens=1, backend="cpu")[0]
    again = nk.mix_add_layernorm(x, mix=cfg, prefix_tokens=1, backend="cpu")[0]
    assert len(builds) == 1 and torch.equal(first, again)
    with torch.no_grad():
        cfg.matrix.mul_(2.0)  # a new version of Q: built again, and the result follows
    changed = nk.mix_add_layernorm(x, mix=cfg, prefix_tokens=1, backend="cpu")[0]
    assert len(builds) == 2 and not torch.equal(first, changed)
    expect = nk.mix_add_layernorm(x, mix=cfg, prefix_tokens=1, backend="reference")[0]
    torch.testing.assert_close(changed, expect, rtol=1e-5, atol=1e-5)


def test_dense_cache_entry_goes_with_its_matrix():
    import gc

    cfg = _dense(8)
    nk.mix_add_layernorm(torch.randn(2, 9, 8), mix=cfg, prefix_tokens=1, backend="cpu")
    key = id(cfg.matrix)
    assert key in common._DENSE_CACHE
    del cfg
    gc.collect()
    assert key not in common._DENSE_CACHE


def test_dense_overflowing_fp32_is_still_rejected():
    cfg = nk.NoiseConfig(kind="dense", matrix=torch.full((4, 4), 1e300, dtype=torch.float64), check_matrix=False)
    with pytest.raises(nk.ConfigError, match="non-finite"):
        nk.mix_add_layernorm(torch.randn(1, 5, 8), mix=cfg, prefix_tokens=1, backend="cpu")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_dense_layer_captures_in_a_cuda_graph(backend):
    if backend_status(backend, "cuda") is not None:
        pytest.skip(backend_status(backend, "cuda"))
    cfg = _dense(16)
    x = torch.randn(4, 17, 64, device="cuda")
    r = torch.randn_like(x)
    w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    eager = nk.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1, backend=backend)  # warms the cache
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nk.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1, backend=backend)
    graph.replay()
    for a, e in zip(out, eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# empty inputs to the Triton LayerNorm ops


@needs_triton
def test_triton_layernorm_ops_take_empty_inputs():
    import noisynn_kernels.ops.mix_add_layernorm.triton  # noqa: F401  (registers the ops)

    for shape in ((0, 5, 8), (2, 0, 8)):
        x = torch.zeros(shape, device=DEVICE)
        normed, rout, mean, rstd = torch.ops.noisynn.mix_add_layernorm_fwd(x, None, None, None, 1e-6, 2, 0, 0.3,
                                                                           1, None, 0, 1, False, False)
        assert normed.shape == rout.shape == shape and mean.shape == rstd.shape == (0,)
        dx, dw, db = torch.ops.noisynn.mix_add_layernorm_bwd(normed, None, rout, None, mean, rstd, 2, 0, 0.3, 1,
                                                             None, 0, 1, False)
        assert dx.shape == shape and torch.equal(dw, torch.zeros(8, device=DEVICE)) and torch.equal(db, dw)


# --------------------------------------------------------------------------------------------------
# autocast: noisy attention casts as SDPA


def test_noisy_attention_under_autocast_casts_like_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 17, 16, generator=g) for _ in range(2))  # fp32, as after a qk_norm
    v = torch.randn(2, 3, 17, 16, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = nk.noisy_attention(q, k, v, backend="reference")
        sdpa = F.scaled_dot_product_attention(q, k, v)
        mixed = nk.noisy_attention(q, k, v, mix="optimal", prefix_tokens=1, backend="reference")
    assert plain.dtype == sdpa.dtype == mixed.dtype == torch.bfloat16
    assert torch.equal(plain, sdpa)
    expect = nk.noisy_attention(q.bfloat16(), k.bfloat16(), v, mix="optimal", prefix_tokens=1, backend="reference")
    torch.testing.assert_close(mixed, expect)
    # outside autocast a dtype mismatch is still an error
    with pytest.raises(nk.ShapeError, match="dtype"):
        nk.noisy_attention(q, k, v, backend="reference")


def test_swapped_qk_norm_model_runs_under_autocast():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, qk_norm=True, num_classes=10)
    nk.apply_noisynn(model, dict(kind="optimal", axis="tokens", position="attn_output"))
    nk.swap_fused_ops(model.eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y.float()).all()


# --------------------------------------------------------------------------------------------------
# the Philox stream of the fused random noises is pinned (counter layout and conversions)

M32 = 0xFFFFFFFF


def _philox4x32_10(counter, key):
    """Philox4x32-10 in plain Python: ``counter`` 4 x uint32, ``key`` 2 x uint32 -> 4 x uint32."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p2 >> 32) ^ c1 ^ k0) & M32, p2 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def test_python_philox_matches_the_known_answers():
    # Random123's known-answer vectors for Philox4x32-10
    assert _philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _philox4x32_10((M32,) * 4, (M32, M32)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)


def _expected_uniform(seed, n):
    out = []
    for g in range((n + 3) // 4):
        out += [(r >> 8) * 2.0 ** -24 for r in _philox4x32_10((g & M32, g >> 32, 0, 0), (seed & M32, seed >> 32))]
    return np.array(out[:n], dtype=np.float32)


def _expected_normal(seed, n):
    out = []
    for g in range((n + 3) // 4):
        r = _philox4x32_10((g & M32, g >> 32, 0, 0), (seed & M32, seed >> 32))
        for a, b in ((r[0], r[1]), (r[2], r[3])):
            rad = math.sqrt(-2.0 * math.log(((a >> 8) + 1) * 2.0 ** -24))
            theta = 2 * math.pi * (b >> 8) * 2.0 ** -24
            out += [rad * math.cos(theta), rad * math.sin(theta)]
    return np.array(out[:n], dtype=np.float64)


@needs_triton
@pytest.mark.parametrize("seed", (7, 2 ** 40 + 3))  # a seed above 2^32 exercises the key's high word
def test_fused_noise_follows_the_pinned_philox_stream(seed):
    n = 2 * 1024 + 6  # several programs and a partial last group of four
    x = torch.zeros(1, 1, n, device=DEVICE)
    z = nk.gaussian_noise(x, seed=seed, strength=1.0, backend="triton").flatten().double().cpu().numpy()
    np.testing.assert_allclose(z, _expected_normal(seed, n), rtol=0, atol=2e-5)
    p = 0.5
    g = torch.ones(1, 1, n, device=DEVICE, requires_grad=True)
    nk.salt_and_pepper_noise(g, p, low=0.0, high=1.0, seed=seed, backend="triton").sum().backward()
    u = _expected_uniform(seed, n)
    replaced = (u < np.float32(p * 0.5)) | (u > np.float32(1.0 - p * 0.5))
    assert np.array_equal(g.grad.flatten().cpu().numpy() == 0, replaced)


# --------------------------------------------------------------------------------------------------
# launch configurations sized for a GPU (their registers and spills: tests/test_kernel_report.py)


@pytest.fixture
def fp32_precision():
    """Sets ``torch.backends.cuda.matmul.fp32_precision`` for a test and restores it."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision

    def set_(value):
        matmul.fp32_precision = value

    yield set_
    matmul.fp32_precision = saved


def test_fp32_attention_dot_precision_follows_torch(fp32_precision):
    pytest.importorskip("triton")
    from noisynn_kernels.ops.noisy_attention import triton as op

    fp32_precision("ieee")
    assert op.fp32_dot_precision() == "ieee"
    fp32_precision("tf32")
    assert op.fp32_dot_precision() == "tf32"
    fp32_precision("none")  # defers to the global setting, ieee unless it was changed
    assert op.fp32_dot_precision() == ("tf32" if torch.backends.fp32_precision == "tf32" else "ieee")


@needs_triton
def test_attention_launches_carry_the_precision_and_their_own_tiles(monkeypatch, fp32_precision):
    from noisynn_kernels.ops.noisy_attention import triton as op

    launches = []
    real = op.wrap_triton

    def recording(kernel):
        launcher = real(kernel)

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append((kernel.__name__, grid, kwargs))
                    return launcher[grid](*args, **kwargs)

                return launch

        return Recorder()

    monkeypatch.setattr(op, "wrap_triton", recording)
    B, H, N, Dh = 1, 2, 1 + 16, 16
    for precision in ("ieee", "tf32"):
        fp32_precision(precision)
        launches.clear()
        q, k, v = (torch.randn(B, H, N, Dh, device=DEVICE, requires_grad=True) for _ in range(3))
        y = nk.noisy_attention(q, k, v, mix=nk.NoiseConfig(kind="shift"), prefix_tokens=1, backend="triton")
        y.sum().backward()
        attn = {name: kw for name, _, kw in launches if name.startswith("attn_")}
        assert set(attn) == {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"}
        for name, kw in attn.items():
            assert kw["DOT_PRECISION"] == precision, name
            t = op.tiles({"attn_fwd_kernel": "fwd", "attn_bwd_dkdv_kernel": "dkdv", "attn_bwd_dq_kernel": "dq"}[name],
                         torch.float32, 16, precision)
            assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) == tuple(t), name
    # the compiled tile tables (the interpreter runs small tiles): fp32 ieee dots (FMA) get smaller tiles than
    # tensor-core ones, and dK/dV its own; every dot dimension at least 16
    monkeypatch.setattr(op, "INTERPRETED", False)
    for bd in (64, 128):
        for kernel in ("fwd", "dkdv", "dq"):
            ieee = op.tiles(kernel, torch.float32, bd, "ieee")
            half = op.tiles(kernel, torch.float16, bd, "ieee")
            assert ieee.block_m * ieee.block_n < half.block_m * half.block_n
            assert min(ieee.block_m, ieee.block_n, half.block_m, half.block_n) >= 16
            assert op.tiles(kernel, torch.bfloat16, bd, "tf32") == half  # precision only changes fp32
        assert op.tiles("dkdv", torch.float16, bd, "tf32") != op.tiles("fwd", torch.float16, bd, "tf32")


def test_layernorm_backward_grid_fills_the_gpu_by_occupancy(monkeypatch):
    pytest.importorskip("triton")
    import types

    from noisynn_kernels.ops.mix_add_layernorm import triton as op

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=108))
    gpu = torch.device("cuda", 0)
    for warps in (4, 8, 16):
        n = op._backward_programs(gpu, 10 ** 6, warps)
        assert n == 108 * (op._TARGET_WARPS_PER_SM // warps)  # 32 resident warps per SM, not one program
        assert n * warps >= 108 * 16
    assert op._backward_programs(gpu, 300, 4) == 300  # never more programs than rows
    assert op._backward_programs(torch.device("meta"), 10 ** 6, 8) == op._DEFAULT_SMS * 4
    assert op._bwd_num_warps(1024) >= op._num_warps(1024)  # backward keeps more of a row live


def test_layernorm_column_sums_split_long_groups():
    """The optimal column-sum pass runs ``(groups, splits)`` programs: a tokens group of 196 rows is 4 slices of
    at most 64 rows, not one program per sample (recorded launches of the op bodies on meta tensors)."""
    pytest.importorskip("triton")
    from noisynn_kernels import kernel_report
    from noisynn_kernels.triton import mix_layernorm as kernels

    launches, refused = kernel_report.record_launches(quick=True, batch=64)
    assert not refused
    sums = [la for la in launches if la.kernel is kernels.group_sum_kernel]
    assert sums
    for la in sums:
        groups, splits, chunks = la.grid
        D = la.case["D"]
        # chunks of the widest block: forward 8192 (D = 16384: two), backward 4096 (D = 16384: four)
        assert chunks == -(-D // min(D, 8192 if la.case["op"].endswith("fwd") else 4096))
        K = {"tokens": 196, "rows": 14}[la.case["axis"]]
        assert splits == -(-K // min(K, 64)) and groups == (64 if la.case["axis"] == "tokens" else 64 * 14)
        assert la.args[la.kernel.arg_names.index("rows_per_split")] == min(K, 64)
    bwd = [la for la in launches if la.kernel is kernels.mix_add_layernorm_bwd_kernel]
    assert bwd and all(la.grid[0] > 132 for la in bwd)  # by occupancy on the assumed 132-SM GPU


def _layernorm_against_fp64(cfg, mix_after_norm, D=40, B=2, N=1 + 16, axis_grid=None):
    """The Triton op's outputs and gradients (fp32) against the reference's in fp64."""
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(B, N, D, generator=g) for _ in range(2))
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    outs = {}
    for name, dt in (("triton", torch.float32), ("reference", torch.float64)):
        args = [t.detach().to(DEVICE if name == "triton" else "cpu", dt).requires_grad_(True) for t in (x, r, w, b)]
        normed, res = nk.mix_add_layernorm(*args, mix=cfg, prefix_tokens=1, mix_after_norm=mix_after_norm,
                                           grid=axis_grid, backend=name)
        (normed * torch.linspace(-1, 1, D, dtype=dt, device=normed.device)).sum().backward()
        outs[name] = [normed, res] + [a.grad for a in args]
    for ours, ref in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=0, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_layernorm_split_column_sums_match_the_reference(monkeypatch, mix_after_norm):
    """Slices of 3 rows (so a 16-row group has 6 partials, the last one short): forward and gradients as the
    reference in fp64."""
    from noisynn_kernels.ops.mix_add_layernorm import triton as op

    monkeypatch.setattr(op, "_ROWS_PER_SPLIT", 3)
    _layernorm_against_fp64(nk.NoiseConfig(kind="optimal"), mix_after_norm)


@needs_triton
@pytest.mark.parametrize("kind,axis", [("identity", "tokens"), ("shift", "tokens"), ("optimal", "tokens"),
                                       ("dense", "tokens"), ("optimal", "batch"), ("shift", "rows")])
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_layernorm_backward_in_chunks_matches_the_reference(monkeypatch, kind, axis, mix_after_norm):
    """Rows longer than the backward's widest block are done in chunks (here 32 columns: D = 100 is four
    chunks, the last one short) after a pass that takes the LayerNorm backward's row sums."""
    from noisynn_kernels.ops.mix_add_layernorm import triton as op

    launched = []
    real = op.wrap_triton
    monkeypatch.setattr(op, "wrap_triton", lambda kernel: launched.append(kernel) or real(kernel))
    monkeypatch.setattr(op, "_BWD_MAX_BLOCK", 32)
    k = 16 if axis == "tokens" else 4 if axis == "rows" else 2
    matrix = 0.1 * torch.rand(k, k, generator=torch.Generator().manual_seed(1)) if kind == "dense" else None
    cfg = nk.NoiseConfig(kind=kind, axis=axis, matrix=matrix, allow_batch_dependence=True)
    _layernorm_against_fp64(cfg, mix_after_norm, D=100, axis_grid=(4, 4) if axis == "rows" else None)
    assert op.kernels.ln_grad_stats_kernel in launched


@needs_triton
@pytest.mark.parametrize("kind,axis", [("identity", "tokens"), ("shift", "tokens"), ("optimal", "tokens"),
                                       ("dense", "tokens"), ("optimal", "batch"), ("shift", "rows")])
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_layernorm_forward_in_chunks_matches_the_reference(monkeypatch, kind, axis, mix_after_norm):
    """Rows longer than the forward's widest block are done in chunks (here 32 columns: D = 100 is four
    chunks, the last one short) after a pass that takes each row's mean and rstd; the backward then runs
    whole rows, so the chunked forward's saved statistics feed the one-block backward."""
    from noisynn_kernels.ops.mix_add_layernorm import triton as op

    launched = []
    real = op.wrap_triton
    monkeypatch.setattr(op, "wrap_triton", lambda kernel: launched.append(kernel) or real(kernel))
    monkeypatch.setattr(op, "_FWD_MAX_BLOCK", 32)
    k = 16 if axis == "tokens" else 4 if axis == "rows" else 2
    matrix = 0.1 * torch.rand(k, k, generator=torch.Generator().manual_seed(1)) if kind == "dense" else None
    cfg = nk.NoiseConfig(kind=kind, axis=axis, matrix=matrix, allow_batch_dependence=True)
    _layernorm_against_fp64(cfg, mix_after_norm, D=100, axis_grid=(4, 4) if axis == "rows" else None)
    assert op.kernels.ln_fwd_stats_kernel in launched
    assert op.kernels.ln_grad_stats_kernel not in launched


@needs_triton
@pytest.mark.parametrize("mix_after_norm", (False, True))
def test_layernorm_chunked_statistics_keep_precision_far_from_zero(monkeypatch, mix_after_norm):
    """Rows with mean 1000 and unit spread, in chunks of 32 columns: the per-chunk two-pass moments merged
    pairwise give the fp32 one-block result (a running sum of squares would lose the variance to
    cancellation: 1e6 against 1 in fp32); both backward paths chunked too."""
    from noisynn_kernels.ops.mix_add_layernorm import triton as op

    g = torch.Generator().manual_seed(3)
    x = 1000.0 + torch.randn(2, 17, 100, generator=g)
    r = torch.randn(2, 17, 100, generator=g)
    cfg = nk.NoiseConfig(kind="optimal")
    whole = nk.mix_add_layernorm(x.to(DEVICE), r.to(DEVICE), mix=cfg, prefix_tokens=1,
                                 mix_after_norm=mix_after_norm, backend="triton")
    monkeypatch.setattr(op, "_FWD_MAX_BLOCK", 32)
    chunked = nk.mix_add_layernorm(x.to(DEVICE), r.to(DEVICE), mix=cfg, prefix_tokens=1,
                                   mix_after_norm=mix_after_norm, backend="triton")
    ref = nk.mix_add_layernorm(x.double(), r.double(), mix=cfg, prefix_tokens=1, mix_after_norm=mix_after_norm,
                               backend="reference")
    for a, b, want in zip(chunked, whole, ref):
        # as close to fp64 as the one-block kernel is (its own error sets the bar), and close to it
        err_whole = (b.double().cpu() - want).abs().max().item()
        err_chunked = (a.double().cpu() - want).abs().max().item()
        assert err_chunked <= 2 * err_whole + 1e-6, (err_chunked, err_whole)
