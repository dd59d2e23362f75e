"""Fused Philox noise kernels (Triton); on CPU through the Triton interpreter (see conftest.py)."""

import pytest
import torch

from noisynn_kernels import BackendUnavailableError, ConfigError
from noisynn_kernels.ops.random_noise import gaussian_noise_fused, salt_and_pepper_noise_fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _tokens(dtype=torch.float32, shape=(4, 37, 123)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_same_seed_same_noise_prefix_untouched(dtype):
    x = _tokens(dtype)
    a = gaussian_noise_fused(x, seed=7, prefix_tokens=5)
    b = gaussian_noise_fused(x, seed=7, prefix_tokens=5)
    c = gaussian_noise_fused(x, seed=8, prefix_tokens=5)
    assert a.dtype == dtype and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :5], x[:, :5])
    assert not torch.equal(a[:, 5:], x[:, 5:])


def test_gaussian_moments_match_parameters():
    x = torch.zeros(1_000_000, device=DEVICE).view(10, 100, 1000)
    strength, mean, std = 0.5, 0.3, 2.0
    y = gaussian_noise_fused(x, seed=3, strength=strength, mean=mean, std=std).double()
    n = y.numel()
    sd = strength * std
    assert abs(y.mean().item() - strength * mean) < 5 * sd / n ** 0.5
    assert abs(y.std().item() - sd) < 5 * sd / (2 * n) ** 0.5


def test_gaussian_noise_independent_of_block_boundaries():
    # Philox keyed by element index: the noise of a tensor's first elements does not depend on its size.
    small = gaussian_noise_fused(torch.zeros(1, 1, 1000, device=DEVICE), seed=11)
    large = gaussian_noise_fused(torch.zeros(1, 1, 5000, device=DEVICE), seed=11)
    assert torch.equal(small[0, 0], large[0, 0, :1000])


def test_gaussian_gradient_is_identity():
    x = _tokens().requires_grad_(True)
    g = torch.randn_like(x)
    gaussian_noise_fused(x, seed=1, prefix_tokens=1).backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_salt_and_pepper_rates_values_and_prefix(dtype):
    x = torch.rand(8, 101, 1000, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype) * 2 - 0.5
    p = 0.2
    y = salt_and_pepper_noise_fused(x, p, seed=5, prefix_tokens=1)
    assert torch.equal(y[:, :1], x[:, :1])
    body_x, body_y = x[:, 1:], y[:, 1:]
    hi, lo = x.amax(), x.amin()
    changed = body_y != body_x
    salt = changed & (body_y == hi)
    pepper = changed & (body_y == lo)
    assert torch.equal(changed, salt | pepper)  # every change is to high or low
    n = body_x.numel()
    se = ((p / 2) * (1 - p / 2) / n) ** 0.5
    # a pixel already equal to high/low "changes" invisibly: negligible for continuous data
    assert abs(salt.float().mean().item() - p / 2) < 5 * se
    assert abs(pepper.float().mean().item() - p / 2) < 5 * se
    assert torch.equal(y, salt_and_pepper_noise_fused(x, p, seed=5, prefix_tokens=1))


def test_salt_and_pepper_explicit_range_and_p_zero():
    x = torch.rand(2, 3, 16, 16, device=DEVICE)
    y = salt_and_pepper_noise_fused(x, 0.5, low=0.0, high=1.0, seed=1)
    changed = y != x
    assert set(y[changed].unique().tolist()) <= {0.0, 1.0}
    assert changed.any()
    assert torch.equal(salt_and_pepper_noise_fused(x, 0.0, seed=1), x)


def test_salt_and_pepper_backward_regenerates_the_forward_mask():
    x = torch.randn(3, 17, 40, device=DEVICE, requires_grad=True)
    # low/high outside the data, so "changed" identifies replaced elements exactly
    y = salt_and_pepper_noise_fused(x, 0.3, low=-100.0, high=100.0, seed=9, prefix_tokens=1)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y.detach() == x.detach()
    assert torch.equal(x.grad, torch.where(kept, g, torch.zeros_like(g)))
    assert (~kept).any() and kept[:, :1].all()


def test_generator_and_seed_reproducibility():
    x = _tokens()
    a = gaussian_noise_fused(x, generator=torch.Generator().manual_seed(4))
    b = gaussian_noise_fused(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    torch.manual_seed(0)
    c = gaussian_noise_fused(x)
    torch.manual_seed(0)
    assert torch.equal(c, gaussian_noise_fused(x))
    with pytest.raises(ConfigError, match="either seed or generator"):
        gaussian_noise_fused(x, seed=1, generator=torch.Generator())


def test_non_contiguous_input():
    base = torch.randn(37, 4, 64, device=DEVICE)
    x = base.transpose(0, 1)  # (4, 37, 64), non-contiguous
    assert torch.equal(gaussian_noise_fused(x, seed=2, prefix_tokens=1),
                       gaussian_noise_fused(x.contiguous(), seed=2, prefix_tokens=1))


def test_bad_arguments():
    x = _tokens()
    with pytest.raises(ConfigError):
        salt_and_pepper_noise_fused(x, 1.5, seed=1)
    with pytest.raises(ConfigError):
        gaussian_noise_fused(x, std=-1.0, seed=1)
    with pytest.raises(ConfigError):
        salt_and_pepper_noise_fused(x, 0.1, low=1.0, high=0.0, seed=1)


def test_refuses_cpu_without_interpreter(monkeypatch):
    import noisynn_kernels.ops.random_noise as fused

    # Whether kernels are interpreted is fixed when they are defined: simulate compiled kernels.
    monkeypatch.setattr(fused, "triton_interpreted", lambda: False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        gaussian_noise_fused(torch.zeros(2, 3, 4), seed=1)


def _op_and_args(op):
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    if op == "gaussian":
        return torch.ops.noisynn.gaussian_noise.default, (x, 3, 0.0, 1.0, 0.1, 1)
    return torch.ops.noisynn.salt_and_pepper_noise.default, (x, x.detach().amin(), x.detach().amax(), 3, 0.2, 1)


# Under the Triton interpreter, AOT dispatch (the torch.compile path) decomposes a triton_op into its
# kernel launch on fake tensors, which only compiled (GPU) kernels support: that part runs on a GPU.
CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("op", ["gaussian", "salt_and_pepper"])
def test_opcheck_schema_autograd_fake(op):
    fn, args = _op_and_args(op)
    torch.library.opcheck(fn, args, test_utils=CPU_OPCHECK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="AOT-dispatch opcheck of a Triton op needs CUDA")
@pytest.mark.parametrize("op", ["gaussian", "salt_and_pepper"])
def test_opcheck_full_on_gpu(op):
    fn, args = _op_and_args(op)
    torch.library.opcheck(fn, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of a Triton op needs CUDA")
def test_compiled_noise_matches_eager():
    x = torch.randn(4, 17, 64, device="cuda")

    def f(t):
        return torch.ops.noisynn.gaussian_noise(t, 5, 0.0, 1.0, 0.1, 1) * 2

    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_noise_module_uses_fused_kernels_when_backend_is_triton(monkeypatch):
    import noisynn_kernels.ops.random_noise as fused
    from noisynn_kernels import NoiseConfig, NoiseInjection

    monkeypatch.setenv("NOISYNN_BACKEND", "triton")
    calls = []
    real = fused.gaussian_noise_fused
    monkeypatch.setattr(fused, "gaussian_noise_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    mod = NoiseInjection(NoiseConfig(kind="gaussian", seed=3), prefix_tokens=1)
    x = torch.randn(2, 5, 8, device=DEVICE)
    a = mod(x)
    mod.reset_generator()
    assert torch.equal(mod(x), a) and len(calls) == 2  # fused, and seeded through the module's generator
    monkeypatch.setenv("NOISYNN_BACKEND", "reference")
    mod(x)
    assert len(calls) == 2
