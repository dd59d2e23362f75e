"""The official presets against the official code's formulas, written out here independently of the package.

Each test builds two copies of one timm model with the same weights: one with the package's preset
(:func:`noisynn_kernels.apply_noisynn`), one plain with a hook that computes what the official NoisyNN model
files compute at the same place.  Logits and the gradient wrt the input must agree to float precision
(fp64 for the linear kinds; fp32 with the same random draws for salt-and-pepper).

- ``NoiseConfig.official_cnn``: the official NoisyResNet adds, at the input of ``layer4[2]``,
  ``x + a * (cat(x[1:], x[:1]) - x).detach()`` with ``a = 0.4``, in training and evaluation: sample ``b``
  receives ``x_{b+1}`` and the gradient passes straight through.
- ``NoiseConfig.official_vit``: the official NoisyViT mixes the patch tokens of the last block's
  LayerNorm-1 output across the batch with the optimal ``Q`` (its loop over the cyclic batch shifts), at
  evaluation only.
- ``NoiseConfig.official_vit_salt_and_pepper``: the official "impulse" noise at the same place: salt and
  pepper are the detached maximum / minimum of the patch tokens of the whole batch (not of the class token).
"""

import copy

import pytest
import timm
import torch

from noisynn_kernels import NoiseConfig, apply_noisynn

VIT_KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)


def _pair(name, cfg, dtype, **kw):
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, **kw).to(dtype)
    noisy = apply_noisynn(copy.deepcopy(plain), cfg)
    return plain, noisy


def _logits_and_input_grad(model, x, seed=None):
    x = x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    out = model(x)
    (gx,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(), x)
    return out.detach(), gx


def _assert_same(model_a, model_b, x, *, rtol, atol, seed=None):
    ya, ga = _logits_and_input_grad(model_a, x, seed)
    yb, gb = _logits_and_input_grad(model_b, x, seed)
    torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
    torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)
    return ya


# --------------------------------------------------------------------------------------------------
# official NoisyResNet


def _official_resnet_noise(alpha):
    """The official NoisyResNet's block-input noise, as a forward pre-hook."""

    def hook(module, args):
        x = args[0]
        shifted = torch.cat((x[1:], x[:1]), dim=0)  # sample b reads sample b + 1
        return (x + alpha * (shifted - x).detach(),) + tuple(args[1:])

    return hook


@pytest.mark.parametrize("training", (True, False))
def test_official_cnn_matches_the_official_formula(training):
    plain, noisy = _pair("resnet34", NoiseConfig.official_cnn(allow_batch_dependence=True), torch.float64,
                         num_classes=5)
    assert len(plain.layer4) == 3
    plain.layer4[2].register_forward_pre_hook(_official_resnet_noise(0.4))
    plain.train(training)
    noisy.train(training)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = _assert_same(noisy, plain, x, rtol=1e-10, atol=1e-12)
    # and the noise is there: the model without it differs
    bare = copy.deepcopy(plain)
    bare.layer4[2]._forward_pre_hooks.clear()
    bare.train(training)
    assert not torch.allclose(bare(x), y)


def test_official_cnn_direction_and_gradient_as_formulas():
    """Sample ``b`` receives ``x_{b+1}`` (changing sample 1 changes sample 0's output, changing sample 3 does
    not, at batch 4), and the gradient wrt the input is the identity at the noise site."""
    from noisynn_kernels import NoiseInjection

    cfg = NoiseConfig.official_cnn(allow_batch_dependence=True)
    assert (cfg.kind, cfg.alpha, cfg.shift, cfg.straight_through, cfg.axis) == ("shift", 0.4, -1, True, "batch")
    site = NoiseInjection(cfg).eval()
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    y = site(x)
    torch.testing.assert_close(y[0], 0.6 * x[0] + 0.4 * x[1])
    torch.testing.assert_close(y[3], 0.6 * x[3] + 0.4 * x[0])
    g = torch.randn_like(x)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    torch.testing.assert_close(gx, g, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# official NoisyViT


def _official_vit_optimal_q(module, args, out):
    """The official NoisyViT's optimal-Q batch mix of the patch tokens (its sum over cyclic shifts)."""
    B = out.shape[0]
    h = out.clone()
    noise = 0
    for i in range(1, B):
        noise = noise + torch.cat((h[i:, 1:], h[:i, 1:]), dim=0)
    mixed = out[:, 1:] - out[:, 1:] * (B - 1) / (B + 1) + noise / (B + 1)
    return torch.cat((out[:, :1], mixed), dim=1)


def test_official_vit_matches_the_official_formula():
    plain, noisy = _pair("vit_tiny_patch16_224", NoiseConfig.official_vit(allow_batch_dependence=True),
                         torch.float64, **VIT_KW)
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plain.train()
    noisy.train()
    _assert_same(noisy, plain, x, rtol=1e-10, atol=1e-12)  # training: off
    plain.blocks[-1].norm1.register_forward_hook(_official_vit_optimal_q)
    plain.eval()
    noisy.eval()
    _assert_same(noisy, plain, x, rtol=1e-10, atol=1e-12)  # evaluation: on


def _official_vit_impulse(p):
    """The official NoisyViT's impulse noise on the patch tokens, extremes over the batch's patch tokens."""

    def hook(module, args, out):
        B, N, D = out.shape
        u = torch.rand(B, N - 1, D)
        salt, pepper = out[:, 1:].max().detach(), out[:, 1:].min().detach()
        body = torch.where(u < p / 2, salt, torch.where(u > 1 - p / 2, pepper, out[:, 1:]))
        return torch.cat((out[:, :1], body), dim=1)

    return hook


def test_official_vit_salt_and_pepper_matches_the_official_formula():
    cfg = NoiseConfig.official_vit_salt_and_pepper(0.2, allow_batch_dependence=True)
    assert (cfg.value_range, cfg.position, cfg.train, cfg.eval) == ("batch", "attn_input", False, True)
    plain, noisy = _pair("vit_tiny_patch16_224", cfg, torch.float32, **VIT_KW)
    plain.blocks[-1].norm1.register_forward_hook(_official_vit_impulse(0.2))
    plain.eval()
    noisy.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _assert_same(noisy, plain, x, rtol=1e-6, atol=1e-6, seed=11)


def test_official_salt_and_pepper_range_ignores_the_class_token():
    """The range is taken over the patch tokens only: a class token holding the batch's extremes (as the
    outlier channels of pretrained ViTs do) neither sets salt / pepper nor is replaced."""
    from noisynn_kernels import NoiseInjection

    cfg = NoiseConfig.official_vit_salt_and_pepper(1.0, allow_batch_dependence=True)
    site = NoiseInjection(cfg, prefix_tokens=1).eval()
    x = torch.rand(2, 5, 8)
    x[:, 0, 0] = 25.9
    x[:, 0, 1] = -33.3
    y = site(x)
    torch.testing.assert_close(y[:, 0], x[:, 0], rtol=0, atol=0)
    patches = x[:, 1:]
    assert set(y[:, 1:].unique().tolist()) <= {patches.max().item(), patches.min().item()}
    assert y[:, 1:].max() <= 1.0 and y[:, 1:].min() >= 0.0
