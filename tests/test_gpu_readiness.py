"""Bugs a real GPU would hit that the Triton interpreter hides, each checked here where it can be (the
launch logic on CPU) and on a GPU where only one can (tests marked ``gpu``):

- launch grids put batch x heads on axis 0 (CUDA caps axes 1 and 2 at 65535);
- every Triton op launches under its input's device (``device_guard``);
- a dense matrix is built and checked once on the host, then cached on the device (no host sync per
  call; CUDA-graph capture works);
- empty inputs to the Triton LayerNorm ops launch nothing (no division by zero);
- under autocast ``noisy_attention`` casts its inputs as SDPA does (``qk_norm`` models).
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
