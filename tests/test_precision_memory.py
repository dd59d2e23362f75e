"""Mixed precision (autocast), channels_last, determinism and memory.

- autocast (bf16 on CPU; fp16/bf16 on CUDA when present): the noise ops and mix_add_layernorm keep the
  input's dtype and value on every backend, a swapped ViT stays within bf16 tolerance of fp32 and of the
  unswapped model under the same autocast;
- a channels_last noisy ResNet matches the contiguous one (outputs and gradients);
- with a fixed seed and torch.use_deterministic_algorithms(True) two training runs are bitwise equal;
- 200 training steps of a tiny swapped model do not grow memory; the fused op saves no more for
  backward than the reference (counted with torch.autograd.graph.saved_tensors_hooks).
"""

import gc
import os
import statistics

import pytest
import timm
import torch

import noisynn_kernels as nk
from noisynn_kernels import NoiseConfig, train
from noisynn_kernels._ext import backend_status

BACKENDS = [b for b in ("reference", "cpu", "triton") if backend_status(b, "cpu") is None]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _tiny_vit(noise, **kw):
    torch.manual_seed(0)
    return timm.create_model("noisy_vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                             num_heads=3, num_classes=5, noise=noise, **kw)


# --------------------------------------------------------------------------------------------------
# autocast: the noise ops keep x's dtype and value


LINEAR = [("identity", "tokens"), ("shift", "rows"), ("optimal", "tokens"), ("dense", "tokens"), ("dense", "batch"),
          ("optimal", "batch")]


@pytest.mark.parametrize("kind,axis", LINEAR)
@pytest.mark.parametrize("shape,prefix", [((3, 17, 24), 1), ((3, 4, 4, 6), 0)], ids=["tokens", "fmap"])
def test_linear_noise_under_cpu_autocast_keeps_dtype_and_value(kind, axis, shape, prefix):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    k = nk.functional.mixed_size(x, axis, prefix)
    q = 0.2 * torch.rand(k, k, generator=g) / k if kind == "dense" else None
    fp32 = nk.linear_transform_noise(x, kind, axis=axis, matrix=q, prefix_tokens=prefix)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = nk.linear_transform_noise(x, kind, axis=axis, matrix=q, prefix_tokens=prefix)
        amp_bf16 = nk.linear_transform_noise(x.bfloat16(), kind, axis=axis, matrix=q, prefix_tokens=prefix)
    assert amp.dtype == torch.float32 and amp_bf16.dtype == torch.bfloat16
    # the dense product used to run in bf16 under autocast and return bf16 for an fp32 input
    torch.testing.assert_close(amp, fp32, rtol=0, atol=0)
    torch.testing.assert_close(amp_bf16.float(), fp32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_random_noise_under_cpu_autocast_keeps_dtype_and_value(dtype):
    x = torch.randn(2, 9, 8).to(dtype)
    for fn in (lambda g: nk.gaussian_noise(x, prefix_tokens=1, generator=g),
               lambda g: nk.salt_and_pepper_noise(x, 0.3, prefix_tokens=1, generator=g)):
        exp = fn(torch.Generator().manual_seed(5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(torch.Generator().manual_seed(5))
        assert got.dtype == dtype
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,axis", [("optimal", "tokens"), ("dense", "tokens"), ("shift", "batch")])
@pytest.mark.parametrize("after", (False, True))
def test_mix_add_layernorm_under_cpu_autocast(backend, kind, axis, after):
    g = torch.Generator().manual_seed(1)
    B, N, D = (3, 10, 32) if backend != "triton" else (2, 5, 8)  # the Triton interpreter is slow
    x, r = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    w, b = 1 + 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)
    k = B if axis == "batch" else N - 1
    q = 0.2 * torch.rand(k, k, generator=g) / k if kind == "dense" else None
    cfg = NoiseConfig(kind=kind, axis=axis, matrix=q, eval=axis != "batch")
    kw = dict(mix=cfg, prefix_tokens=1, mix_after_norm=after, backend=backend)
    exp = nk.mix_add_layernorm(x, r, w, b, 1e-6, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nk.mix_add_layernorm(x, r, w, b, 1e-6, **kw)
    for a, e in zip(got, exp):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    if backend == "triton":
        return  # no bfloat16 in Triton's interpreter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got16 = nk.mix_add_layernorm(x.bfloat16(), r.bfloat16(), w, b, 1e-6, **kw)
    e64 = nk.mix_add_layernorm(x.bfloat16().double(), r.bfloat16().double(), w.double(), b.double(), 1e-6,
                               **dict(kw, backend="reference"))
    for a, e in zip(got16, e64):
        assert a.dtype == torch.bfloat16
        # bf16 outputs: within a few bf16 ulps of the fp64 value of the same inputs
        torch.testing.assert_close(a.double(), e, rtol=2 ** -7, atol=2 ** -7)


NOISES = [False, dict(kind="optimal", axis="tokens"), dict(kind="shift", axis="rows", position="attn_input"),
          dict(kind="dense", axis="batch", eval=False, matrix=(0.05 * torch.ones(4, 4)).tolist())]


@pytest.mark.parametrize("noise", NOISES, ids=["none", "optimal-tokens", "shift-rows-attn", "dense-batch"])
def test_swapped_vit_under_cpu_autocast(noise):
    model = _tiny_vit(noise).train()
    fused = _tiny_vit(noise).train()
    fused.load_state_dict(model.state_dict())
    nk.swap_fused_ops(fused)  # the device's default backend (the C++ kernels when built)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y32 = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = model(x), fused(x)
    assert ya.dtype == yb.dtype == torch.bfloat16  # the head is a linear layer: autocast's dtype
    scale = y32.abs().max().item()
    torch.testing.assert_close(yb.float(), ya.float(), rtol=0, atol=0.02 * scale)  # same autocast, two paths
    torch.testing.assert_close(yb.float(), y32, rtol=0, atol=0.05 * scale)         # bf16 vs fp32
    ya.float().square().sum().backward()
    yb.float().square().sum().backward()
    for (n, pa), (_, pb) in zip(model.named_parameters(), fused.named_parameters()):
        assert pb.grad is not None and pb.grad.dtype == torch.float32, n
        ref = pa.grad.abs().max().item()
        torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=0.05 * ref + 1e-6, msg=n)


@pytest.mark.parametrize("noise", [dict(kind="shift", alpha=0.4, axis="rows", layer=-2),
                                   dict(kind="optimal", axis="tokens", layer=-2),
                                   dict(kind="dense", axis="tokens", layer=-2,
                                        matrix=(0.1 * torch.eye(4, 4).roll(1, 0)).tolist())],
                         ids=["shift-rows", "optimal-tokens", "dense-tokens"])
def test_channels_last_resnet_matches_contiguous(noise):
    torch.manual_seed(0)
    model = timm.create_model("noisy_resnet18", num_classes=5, noise=noise).train()
    cl = timm.create_model("noisy_resnet18", num_classes=5, noise=noise).train()
    cl.load_state_dict(model.state_dict())
    cl.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # layer4[0] input: 2 x 2 maps
    ya = model(x)
    yb = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-4)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), (_, pb) in zip(model.named_parameters(), cl.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-3, atol=1e-4 * max(1.0, pa.grad.abs().max().item()),
                                   msg=n)
    # the noise really ran on a channels_last feature map and kept its layout
    seen = {}
    site = cl.layer4[0].noisynn
    h = site.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    cl(x.contiguous(memory_format=torch.channels_last))
    h.remove()
    assert seen["inp"].is_contiguous(memory_format=torch.channels_last) and not seen["inp"].is_contiguous()
    assert seen["out"].is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------
# determinism


@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


TRAIN = ["--model", "noisy_vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "5", "--steps", "4",
         "--batch-size", "6", "--seed", "11", "--device", "cpu", "--deterministic", "--quiet",
         "--model-kwargs", '{"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}']


@pytest.mark.parametrize("noise,extra", [
    ('{"kind": "gaussian", "strength": 0.5, "seed": 3}', []),
    ('{"kind": "salt_and_pepper", "p": 0.2, "seed": 3}', ["--fused"]),
    ('{"kind": "gaussian", "strength": 0.5, "position": "image"}', []),   # global RNG, seeded by --seed
], ids=["gaussian-seeded", "salt_and_pepper-seeded-fused", "gaussian-global-rng"])
def test_two_training_runs_are_bitwise_equal(tmp_path, deterministic_algorithms, noise, extra):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}.pt"
        assert train.main([*TRAIN, "--noise", noise, *extra, "--out", str(out)]) == 0
        assert torch.are_deterministic_algorithms_enabled()
        runs.append(torch.load(out))
    a, b = runs
    assert a["losses"] == b["losses"]
    assert a["grads"].keys() == b["grads"].keys() and a["params"].keys() == b["params"].keys()
    for n in a["grads"]:
        assert torch.equal(a["grads"][n], b["grads"][n]), n
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n
    # the noise is live: another seed changes the run
    out = tmp_path / "other.pt"
    assert train.main([*TRAIN[:TRAIN.index("--seed") + 1], "12", *TRAIN[TRAIN.index("--seed") + 2:],
                       "--noise", noise.replace('"seed": 3', '"seed": 4'), *extra, "--out", str(out)]) == 0
    assert torch.load(out)["losses"] != a["losses"]


# --------------------------------------------------------------------------------------------------
# memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): some deprecated torch objects warn when their __class__ is read
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc (Linux)")
def test_200_training_steps_do_not_grow_memory():
    """Leaks are measured two ways: live Python tensors (gc) must not grow at all between step 50 and step
    200, and the resident set (what a leak of C++-held tensors or autograd graphs would grow) must not
    trend upwards by more than allocator noise (a leaked graph of this model is ~0.7 MB per step, so
    150 steps would add ~100 MB)."""
    model = _tiny_vit(dict(kind="optimal", axis="tokens"))
    nk.swap_fused_ops(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2,), generator=g)
    rss, tensors = [], {}
    for step in range(1, 201):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rss.append(_rss_bytes())
        if step in (50, 200):
            tensors[step] = _live_tensors()
    assert tensors[200] <= tensors[50], tensors
    early, late = statistics.median(rss[40:80]), statistics.median(rss[160:200])
    assert late - early < 20 * 2 ** 20, f"RSS grew by {(late - early) / 2 ** 20:.1f} MB over 120 steps"


def _saved(fn):
    """(count, bytes) of the tensors autograd saves for backward while ``fn`` runs (storages counted once)."""
    storages = {}
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        storages[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return count, sum(storages.values()), out


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("kind", ("identity", "shift", "optimal", "dense"))
@pytest.mark.parametrize("after", (False, True))
def test_fused_backward_saves_no_more_than_reference(backend, kind, after):
    B, N, D = (4, 17, 64) if backend != "triton" else (2, 6, 16)  # the Triton interpreter is slow
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=g).requires_grad_() for s in ((B, N, D), (B, N, D), (D,), (D,))]
    q = 0.1 * torch.rand(N - 1, N - 1, generator=g) if kind == "dense" else None
    cfg = NoiseConfig(kind=kind, matrix=q)
    run = lambda be: lambda: nk.mix_add_layernorm(*leaves, mix=cfg, prefix_tokens=1,  # noqa: E731
                                                   mix_after_norm=after, backend=be)
    n_fused, bytes_fused, out = _saved(run(backend))
    n_ref, bytes_ref, _ = _saved(run("reference"))
    assert n_fused <= n_ref and bytes_fused <= bytes_ref, (n_fused, bytes_fused, n_ref, bytes_ref)
    # exactly: residual_out (B N D), fp32 mean and rstd (B N each), weight (D), the k x k matrix for dense
    expected = B * N * D * 4 + 2 * B * N * 4 + D * 4 + (4 * (N - 1) ** 2 if kind == "dense" else 0)
    assert bytes_fused == expected
    sum(o.sum() for o in out).backward()  # and backward works from what was saved
    assert all(t.grad is not None for t in leaves)


def test_swapped_vit_saves_no_more_than_unswapped():
    x = torch.randn(4, 3, 32, 32)
    for noise in (False, dict(kind="optimal", axis="tokens"), dict(kind="shift", axis="rows", position="attn_input")):
        model = _tiny_vit(noise).train()
        n_plain, bytes_plain, _ = _saved(lambda model=model: model(x))
        nk.swap_fused_ops(model)
        n_fused, bytes_fused, _ = _saved(lambda model=model: model(x))
        assert n_fused < n_plain and bytes_fused <= bytes_plain, (noise, n_fused, bytes_fused, n_plain, bytes_plain)


# --------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("amp_dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("backend", ("reference", "triton"))
def test_mix_add_layernorm_under_cuda_autocast(amp_dtype, backend):
    if backend_status(backend, "cuda") is not None:
        pytest.skip(backend_status(backend, "cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    B, N, D = 4, 65, 128
    x, r = (torch.randn(B, N, D, device="cuda", generator=g) for _ in range(2))
    w, b = torch.ones(D, device="cuda"), torch.zeros(D, device="cuda")
    cfg = NoiseConfig(kind="dense", matrix=0.1 * torch.rand(N - 1, N - 1) / N)
    exp = nk.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1, backend=backend)
    with torch.autocast("cuda", dtype=amp_dtype):
        got = nk.mix_add_layernorm(x, r, w, b, mix=cfg, prefix_tokens=1, backend=backend)
        low = nk.mix_add_layernorm(x.to(amp_dtype), r.to(amp_dtype), w, b, mix=cfg, prefix_tokens=1, backend=backend)
    for a, e, lo in zip(got, exp, low):
        assert a.dtype == torch.float32 and lo.dtype == amp_dtype
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lo.float(), e, rtol=2e-2, atol=2e-2 if amp_dtype == torch.float16 else 6e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("amp_dtype", (torch.float16, torch.bfloat16))
def test_swapped_vit_under_cuda_autocast(amp_dtype):
    model = _tiny_vit(dict(kind="optimal", axis="tokens")).cuda().train()
    fused = _tiny_vit(dict(kind="optimal", axis="tokens")).cuda().train()
    fused.load_state_dict(model.state_dict())
    nk.swap_fused_ops(fused)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    y32 = model(x)
    with torch.autocast("cuda", dtype=amp_dtype):
        ya, yb = model(x), fused(x)
    assert ya.dtype == yb.dtype == amp_dtype
    scale = y32.abs().max().item()
    torch.testing.assert_close(yb.float(), ya.float(), rtol=0, atol=0.02 * scale)
    torch.testing.assert_close(yb.float(), y32, rtol=0, atol=0.05 * scale)
    yb.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())


@pytest.mark.gpu
@needs_cuda
def test_cuda_memory_does_not_grow_over_200_steps():
    model = _tiny_vit(dict(kind="optimal", axis="tokens")).cuda().train()
    nk.swap_fused_ops(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32, device="cuda"), torch.randint(0, 5, (4,), device="cuda")
    allocated = []
    for _ in range(200):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert allocated[-1] == allocated[49], (allocated[49], allocated[-1])
    assert max(allocated[50:]) == max(allocated[10:50])


@pytest.mark.gpu
@needs_cuda
def test_cuda_fused_backward_saves_no_more_than_reference():
    B, N, D = 8, 65, 256
    leaves = [torch.randn(*s, device="cuda").requires_grad_() for s in ((B, N, D), (B, N, D), (D,), (D,))]
    cfg = NoiseConfig(kind="optimal")
    fused = _saved(lambda: nk.mix_add_layernorm(*leaves, mix=cfg, prefix_tokens=1))
    ref = _saved(lambda: nk.mix_add_layernorm(*leaves, mix=cfg, prefix_tokens=1, backend="reference"))
    assert fused[0] <= ref[0] and fused[1] <= ref[1]
