"""The random noises, noisynn_kernels.gaussian_noise and salt_and_pepper_noise, on their backends.

The backends (the ``backend`` fixture, tests/_backends.py): ``reference`` (``torch.randn`` / ``torch.rand``) and
``triton`` (the fused Philox kernels: on a GPU, or on the CPU in Triton's interpreter, which has no bf16).  The
two agree in distribution, not element by element, so the properties both must have are tested on both: prefix
tokens untouched, the same seed or generator state gives the same noise, the moments and rates of the
parameters, the gradients, p = 0 is the identity, the argument checks.  The tests of the Triton ops themselves
(Philox keyed by element index, registration, torch.compile) run on ``triton`` only.
"""

import pytest
import torch
from _backends import backends

import noisynn_kernels as nk
from noisynn_kernels import BackendUnavailableError, ConfigError
from noisynn_kernels.functional import backend_for

#: The backends of the noises.
ALL = ("reference", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tokens(device, dtype=torch.float32, shape=(4, 37, 123)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)


@backends(*ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_same_seed_same_noise_prefix_untouched(backend, dtype):
    backend.skip_unless(dtype)
    x = _tokens(backend.device, dtype)

    def noise(seed):
        return nk.gaussian_noise(x, seed=seed, prefix_tokens=5, backend=backend.name)

    a, b, c = noise(7), noise(7), noise(8)
    assert a.dtype == dtype and a.shape == x.shape and a.device == x.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :5], x[:, :5])
    assert not torch.equal(a[:, 5:], x[:, 5:])


@backends(*ALL)
def test_gaussian_moments_match_parameters(backend):
    x = torch.zeros(1_000_000, device=backend.device).view(10, 100, 1000)
    strength, mean, std = 0.5, 0.3, 2.0
    y = nk.gaussian_noise(x, seed=3, strength=strength, mean=mean, std=std, backend=backend.name).double()
    n = y.numel()
    sd = strength * std
    assert abs(y.mean().item() - strength * mean) < 5 * sd / n ** 0.5
    assert abs(y.std().item() - sd) < 5 * sd / (2 * n) ** 0.5


@backends("triton")
def test_gaussian_noise_independent_of_block_boundaries(backend):
    # Philox keyed by element index: the noise of a tensor's first elements does not depend on its size.
    small = nk.gaussian_noise(torch.zeros(1, 1, 1000, device=backend.device), seed=11, backend="triton")
    large = nk.gaussian_noise(torch.zeros(1, 1, 5000, device=backend.device), seed=11, backend="triton")
    assert torch.equal(small[0, 0], large[0, 0, :1000])


@backends(*ALL)
def test_gaussian_gradient_is_identity(backend):
    x = _tokens(backend.device).requires_grad_(True)
    g = torch.randn_like(x)
    nk.gaussian_noise(x, seed=1, prefix_tokens=1, backend=backend.name).backward(g)
    assert torch.equal(x.grad, g)


def _extremes(body, value_range):
    """The expected ``(low, high)`` of ``value_range``: each sample's own (broadcasting shape) or the batch's."""
    if value_range == "sample":
        flat = body.reshape(body.shape[0], -1)
        shape = (body.shape[0],) + (1,) * (body.dim() - 1)
        return flat.amin(dim=1).view(shape), flat.amax(dim=1).view(shape)
    return body.amin(), body.amax()


@backends(*ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_salt_and_pepper_rates_values_and_prefix(backend, dtype):
    """Each patch element becomes high (salt) or low (pepper) with probability p/2 each, by default each
    sample's own extremes of its patch elements; prefix tokens are untouched."""
    backend.skip_unless(dtype)
    x = torch.rand(8, 101, 1000, generator=torch.Generator().manual_seed(2)).to(backend.device, dtype) * 2 - 0.5
    p = 0.2
    y = nk.salt_and_pepper_noise(x, p, seed=5, prefix_tokens=1, backend=backend.name)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y[:, :1], x[:, :1])
    body_x, body_y = x[:, 1:], y[:, 1:]
    lo, hi = _extremes(body_x, "sample")
    changed = body_y != body_x
    salt = changed & (body_y == hi)
    pepper = changed & (body_y == lo)
    assert torch.equal(changed, salt | pepper)  # every change is to high or low
    n = body_x.numel()
    se = ((p / 2) * (1 - p / 2) / n) ** 0.5
    # a pixel already equal to high/low "changes" invisibly: negligible for continuous data
    assert abs(salt.float().mean().item() - p / 2) < 5 * se
    assert abs(pepper.float().mean().item() - p / 2) < 5 * se
    assert torch.equal(y, nk.salt_and_pepper_noise(x, p, seed=5, prefix_tokens=1, backend=backend.name))


@backends(*ALL)
@pytest.mark.parametrize("value_range", ("sample", "batch"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_salt_and_pepper_value_range(backend, dtype, value_range):
    """high / low not given: the extremes of the patch elements (prefix tokens excluded) of each sample
    (``'sample'``: no sample depends on the others) or of the whole batch (``'batch'``)."""
    backend.skip_unless(dtype)
    x = torch.rand(4, 9, 64, generator=torch.Generator().manual_seed(3)).to(backend.device, dtype)
    x[:, 0] = 5.0  # a prefix token outside the patches' range: it does not count for low / high
    x[1] *= 0.5  # a sample with a range of its own

    def noise(t):
        return nk.salt_and_pepper_noise(t, 0.5, value_range=value_range, seed=6, prefix_tokens=1,
                                        backend=backend.name)

    y = noise(x)
    assert torch.equal(y[:, :1], x[:, :1])
    lo, hi = _extremes(x[:, 1:], value_range)
    body_x, body_y = x[:, 1:], y[:, 1:]
    changed = body_y != body_x
    assert torch.equal(changed, changed & ((body_y == hi) | (body_y == lo)))
    assert ((body_y == hi) & changed).any() and ((body_y == lo) & changed).any()
    x2 = x.clone()
    x2[0, 1:] *= 10  # another range for sample 0: the others change only under the batch rule
    y2 = noise(x2)
    assert torch.equal(y2[2:], y[2:]) is (value_range == "sample")


@backends(*ALL)
def test_salt_and_pepper_explicit_range_and_p_zero(backend):
    x = torch.rand(2, 3, 16, 16, device=backend.device)
    y = nk.salt_and_pepper_noise(x, 0.5, low=0.0, high=1.0, seed=1, backend=backend.name)
    changed = y != x
    assert set(y[changed].unique().tolist()) <= {0.0, 1.0}
    assert changed.any()
    assert torch.equal(nk.salt_and_pepper_noise(x, 0.0, seed=1, backend=backend.name), x)


@backends(*ALL)
def test_salt_and_pepper_gradient_passes_only_kept_elements(backend):
    """The gradient is that of the kept elements, zero where an element was replaced (the fused backward
    regenerates the forward's mask from the seed)."""
    x = torch.randn(3, 17, 40, device=backend.device, requires_grad=True)
    # low/high outside the data, so "changed" identifies replaced elements exactly
    y = nk.salt_and_pepper_noise(x, 0.3, low=-100.0, high=100.0, seed=9, prefix_tokens=1, backend=backend.name)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y.detach() == x.detach()
    assert torch.equal(x.grad, torch.where(kept, g, torch.zeros_like(g)))
    assert (~kept).any() and kept[:, :1].all()


@backends(*ALL)
def test_generator_and_seed_reproducibility(backend):
    x = _tokens(backend.device)

    def noise(**kw):
        return nk.gaussian_noise(x, backend=backend.name, **kw)

    assert torch.equal(noise(generator=torch.Generator(device=backend.device).manual_seed(4)),
                       noise(generator=torch.Generator(device=backend.device).manual_seed(4)))
    torch.manual_seed(0)
    c = noise()
    torch.manual_seed(0)
    assert torch.equal(c, noise())
    with pytest.raises(ConfigError, match="either seed or generator"):
        noise(seed=1, generator=torch.Generator(device=backend.device))


@backends(*ALL)
def test_non_contiguous_input(backend):
    base = torch.randn(37, 4, 64, device=backend.device)
    x = base.transpose(0, 1)  # (4, 37, 64), non-contiguous
    assert not x.is_contiguous()
    assert torch.equal(nk.gaussian_noise(x, seed=2, prefix_tokens=1, backend=backend.name),
                       nk.gaussian_noise(x.contiguous(), seed=2, prefix_tokens=1, backend=backend.name))


@backends(*ALL)
def test_bad_arguments(backend):
    x = _tokens(backend.device)
    with pytest.raises(ConfigError, match="p must be"):
        nk.salt_and_pepper_noise(x, 1.5, seed=1, backend=backend.name)
    with pytest.raises(ConfigError, match="std must be"):
        nk.gaussian_noise(x, std=-1.0, seed=1, backend=backend.name)
    with pytest.raises(ConfigError, match="low must be <= high"):
        nk.salt_and_pepper_noise(x, 0.1, low=1.0, high=0.0, seed=1, backend=backend.name)
    with pytest.raises(ConfigError, match="value_range"):
        nk.salt_and_pepper_noise(x, 0.1, value_range="image", seed=1, backend=backend.name)
    with pytest.raises(ConfigError, match="seed must be"):
        nk.gaussian_noise(x, seed=-1, backend=backend.name)
    with pytest.raises(ConfigError, match="either seed or generator"):
        nk.salt_and_pepper_noise(x, 0.1, seed=1, generator=torch.Generator(device=backend.device),
                                 backend=backend.name)
    with pytest.raises(nk.ShapeError, match="prefix_tokens = 37"):
        nk.gaussian_noise(x, prefix_tokens=37, seed=1, backend=backend.name)


def test_backends_of_the_noises(monkeypatch):
    """Automatic: reference on the CPU.  The noises have no compiled cpu / cuda kernels; NOISYNN_BACKEND is a
    preference that the noises ignore when they lack that backend."""
    monkeypatch.delenv("NOISYNN_BACKEND", raising=False)
    x = torch.zeros(1, 2, 3)
    for op in ("gaussian", "salt_and_pepper"):
        assert backend_for(op, "cpu") == "reference"
    with pytest.raises(BackendUnavailableError, match="no gaussian kernels"):
        nk.gaussian_noise(x, backend="cpu")
    with pytest.raises(BackendUnavailableError, match="no salt_and_pepper kernels"):
        nk.salt_and_pepper_noise(x, 0.1, backend="cuda")
    monkeypatch.setenv("NOISYNN_BACKEND", "cpu")
    assert backend_for("gaussian", "cpu") == "reference"
    assert torch.equal(nk.gaussian_noise(x, seed=1), nk.gaussian_noise(x, seed=1, backend="reference"))


def test_refuses_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    import noisynn_kernels.ops.random_noise.triton as fused

    # Whether kernels are interpreted is fixed when they are defined: simulate compiled kernels.
    monkeypatch.setattr(fused, "triton_interpreted", lambda: False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        nk.gaussian_noise(torch.zeros(2, 3, 4), seed=1, backend="triton")


# --------------------------------------------------------------------------------------------------
# the Triton ops


def _op_and_args(op, device):
    import noisynn_kernels.ops.random_noise.triton  # noqa: F401  (registers the ops)

    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    if op == "gaussian":
        return torch.ops.noisynn.gaussian_noise.default, (x, 3, 0.0, 1.0, 0.1, 1)
    return torch.ops.noisynn.salt_and_pepper_noise.default, (x, x.detach().amin(), x.detach().amax(), 3, 0.2, 1)


# Under the Triton interpreter, AOT dispatch (the torch.compile path) decomposes a triton_op into its
# kernel launch on fake tensors, which only compiled (GPU) kernels support: that part runs on a GPU.
INTERPRETER_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@backends("triton")
@pytest.mark.parametrize("op", ["gaussian", "salt_and_pepper"])
def test_opcheck(backend, op):
    """Every opcheck test; under Triton's interpreter schema, autograd registration and fake tensor."""
    fn, args = _op_and_args(op, backend.device)
    kw = {"test_utils": INTERPRETER_OPCHECK} if backend.interpreted else {}
    torch.library.opcheck(fn, args, **kw)


@pytest.mark.gpu
@backends("triton")
def test_compiled_noise_matches_eager(backend):
    backend.skip_if_interpreted("torch.compile of a Triton op needs compiled kernels (a GPU)")
    _op_and_args("gaussian", backend.device)
    x = torch.randn(4, 17, 64, device=backend.device)

    def f(t):
        return torch.ops.noisynn.gaussian_noise(t, 5, 0.0, 1.0, 0.1, 1) * 2

    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


@backends("triton")
def test_noise_module_uses_fused_kernels_when_backend_is_triton(backend, monkeypatch):
    from noisynn_kernels import NoiseConfig, NoiseInjection
    from noisynn_kernels.ops import random_noise

    monkeypatch.setenv("NOISYNN_BACKEND", "triton")
    calls = []
    real = random_noise.GAUSSIAN["triton"]
    monkeypatch.setitem(random_noise.GAUSSIAN, "triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    mod = NoiseInjection(NoiseConfig(kind="gaussian", seed=3), prefix_tokens=1)
    x = torch.randn(2, 5, 8, device=backend.device)
    a = mod(x)
    mod.reset_generator()
    assert torch.equal(mod(x), a) and len(calls) == 2  # fused, and seeded through the module's generator
    monkeypatch.setenv("NOISYNN_BACKEND", "reference")
    mod(x)
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------------
# seeds under CUDA graphs: eager calls draw the seed on the host, captured launches read [seed, offset] from
# the device and advance it (the capture state is mocked here where no GPU is; the gpu test captures a graph)


def _ops():
    from noisynn_kernels.ops.random_noise import triton as ops

    return ops


@backends("triton")
def test_eager_seed_comes_from_the_global_rng_and_starts_the_device_stream(backend, monkeypatch):
    ops = _ops()
    monkeypatch.setattr(ops, "_STATES", {})
    x = torch.zeros(2, 3, 700, device=backend.device)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())  # the draw an eager call makes
    torch.manual_seed(5)
    a = nk.gaussian_noise(x, strength=1.0, backend="triton")
    assert torch.equal(a, nk.gaussian_noise(x, seed=seed, strength=1.0, backend="triton"))
    state = ops.stream_state(x.device)
    assert state.dtype == torch.int64 and state.device == x.device
    assert state.tolist() == [seed, ops.counters_used(x.numel())]  # the graph stream continues this call's
    nk.gaussian_noise(x, strength=1.0, backend="triton")
    assert state.tolist() == [seed, ops.counters_used(x.numel())]  # later eager calls leave it alone


@backends("triton")
def test_captured_launches_read_and_advance_the_device_state(backend, monkeypatch):
    ops = _ops()
    monkeypatch.setattr(ops, "_STATES", {})
    x = torch.zeros(1, 1, 1500, device=backend.device)
    monkeypatch.setattr(ops, "_capturing", lambda device: True)
    with pytest.raises(BackendUnavailableError, match="warm-up"):
        nk.gaussian_noise(x, backend="triton")  # no eager call on the device yet: no state to start from
    monkeypatch.setattr(ops, "_capturing", lambda device: False)
    torch.manual_seed(9)
    nk.gaussian_noise(x, strength=1.0, backend="triton")  # the warm-up
    seed, offset = ops.stream_state(x.device).tolist()
    monkeypatch.setattr(ops, "_capturing", lambda device: True)
    draws = [nk.gaussian_noise(x, strength=1.0, backend="triton") for _ in range(2)]  # two launches / replays
    assert not torch.equal(draws[0], draws[1])
    used = ops.counters_used(x.numel())
    assert ops.stream_state(x.device).tolist() == [seed, offset + 2 * used]
    # each draw is the seed's stream from its offset on: counter c serves elements 4c .. 4c + 3
    monkeypatch.setattr(ops, "_capturing", lambda device: False)
    long = nk.gaussian_noise(torch.zeros(1, 1, 4 * (offset + 2 * used), device=backend.device), seed=seed,
                             strength=1.0, backend="triton").flatten()
    for i, d in enumerate(draws):
        start = 4 * (offset + i * used)
        assert torch.equal(d.flatten(), long[start:start + x.numel()])
    # an explicit seed stays the seed under capture (the same noise on every replay, as asked)
    monkeypatch.setattr(ops, "_capturing", lambda device: True)
    fixed = nk.gaussian_noise(x, seed=3, strength=1.0, backend="triton")
    assert ops.stream_state(x.device).tolist() == [seed, offset + 2 * used]
    monkeypatch.setattr(ops, "_capturing", lambda device: False)
    assert torch.equal(fixed, nk.gaussian_noise(x, seed=3, strength=1.0, backend="triton"))


@backends("triton")
def test_captured_salt_and_pepper_backward_regenerates_the_forward_mask(backend, monkeypatch):
    ops = _ops()
    monkeypatch.setattr(ops, "_STATES", {})
    x = torch.ones(2, 5, 300, device=backend.device)
    nk.salt_and_pepper_noise(x, 0.3, low=0.0, high=0.0, prefix_tokens=1, backend="triton")  # the warm-up
    monkeypatch.setattr(ops, "_capturing", lambda device: True)
    masks = []
    for _ in range(2):
        g = x.clone().requires_grad_(True)
        y = nk.salt_and_pepper_noise(g, 0.3, low=0.0, high=0.0, prefix_tokens=1, backend="triton")
        y.sum().backward()
        replaced = y == 0
        assert torch.equal(g.grad == 0, replaced)  # backward read the same [seed, offset] as its forward
        assert 0.2 < replaced[:, 1:].float().mean().item() < 0.4 and not replaced[:, 0].any()
        masks.append(replaced)
    assert not torch.equal(masks[0], masks[1])


def test_key_argument_is_checked():
    pytest.importorskip("triton")
    ops = _ops()
    x = torch.zeros(4)
    for bad in (torch.zeros(2, dtype=torch.int32), torch.zeros(3, dtype=torch.int64)):
        with pytest.raises(nk.ShapeError, match=r"int64 \[seed, offset\]"):
            ops._key_arg(bad, x)
    assert ops._key_arg(None, x) == (x, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_draw_new_noise():
    """Capture a graph around both fused noises, replay it twice: new noise each replay, with the right
    moments and rates (a seed drawn on the host at capture would replay the same noise)."""
    from noisynn_kernels._ext import backend_status

    if backend_status("triton", "cuda") is not None:
        pytest.skip(backend_status("triton", "cuda"))
    x = torch.zeros(8, 197, 768, device="cuda")
    ones = torch.ones_like(x)

    def step():
        g = nk.gaussian_noise(x, strength=0.5, std=2.0, prefix_tokens=1, backend="triton")
        s = nk.salt_and_pepper_noise(ones, 0.2, low=0.0, high=0.0, prefix_tokens=1, backend="triton")
        return g, s

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: makes the device's stream state
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g, s = step()
    draws = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        draws.append((g.clone(), s.clone()))
    (g1, s1), (g2, s2) = draws
    assert not torch.equal(g1, g2) and not torch.equal(s1, s2)
    for gd, sd in draws:
        body = gd[:, 1:].double()
        n = body.numel()
        assert torch.equal(gd[:, 0], x[:, 0]) and torch.equal(sd[:, 0], ones[:, 0])
        assert abs(body.mean().item()) < 5 * 1.0 / n ** 0.5
        assert abs(body.std().item() - 1.0) < 5 * 1.0 / (2 * n) ** 0.5
        rate = (sd[:, 1:] == 0).double().mean().item()
        assert abs(rate - 0.2) < 5 * (0.2 * 0.8 / n) ** 0.5
