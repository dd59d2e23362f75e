"""timm integration: registered ``noisy_*`` models, apply_noisynn / remove_noisynn, noise sites and modes.

All models are built at a tiny size (ViT: 32 px, 1-3 blocks; CNNs: 64 px inputs) and never with
``pretrained=True`` (no downloads).  ResNets are built with ``zero_init_last=False``: with timm's default
zero-initialised last BatchNorm, a mean-preserving mix (optimal / shift) at the input of the last block
is invisible after global average pooling, and "noise changes the output" checks would be vacuous.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import noisynn_kernels as nk  # registers the noisy_* models with timm
from noisynn_kernels import (
    BatchDependenceError,
    ConfigError,
    NoiseConfig,
    NoiseInjection,
    UnsupportedModelError,
    apply_noisynn,
    linear_transform_noise,
    noise_config,
    remove_noisynn,
)
from noisynn_kernels.models import base_model_name, model_blocks

EXPECTED_NAMES = {f"noisy_vit_{s}_patch16_{r}" for s in ("tiny", "small", "base", "large") for r in (224, 384)} | {
    f"noisy_resnet{d}" for d in (18, 34, 50, 101)}

VIT = "noisy_vit_tiny_patch16_224"
RESNET = "noisy_resnet18"
RESNET_KW = dict(num_classes=10, zero_init_last=False)


def vit_kw(depth=2, **extra):
    return dict(img_size=32, depth=depth, num_classes=10, **extra)


def tiny_kwargs(name):
    """(create kwargs, input shape) for a registered noisy model at a tiny size."""
    if base_model_name(name).startswith("vit"):
        return vit_kw(depth=1), (2, 3, 32, 32)
    return dict(RESNET_KW), (2, 3, 64, 64)


_UNSET = object()


def make_pair(name, noise=_UNSET, **kw):
    """(plain timm model, registered noisy model) with the same kwargs and the same weights, in eval mode."""
    plain = timm.create_model(base_model_name(name), **kw)
    kwargs = dict(kw)
    if noise is not _UNSET:
        kwargs["noise"] = noise
    noisy = timm.create_model(name, **kwargs)
    noisy.load_state_dict(plain.state_dict(), strict=True)
    return plain.eval(), noisy.eval()


def noise_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NoiseInjection)]


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def differs(a, b, tol=1e-5):
    return (a - b).abs().max().item() > tol


class Record:
    """Records the first positional input (and output) of every call of ``module``."""

    def __init__(self, module, pre=False):
        self.inputs, self.outputs = [], []
        if pre:
            self.handle = module.register_forward_pre_hook(self._pre)
        else:
            self.handle = module.register_forward_hook(self._post)

    def _pre(self, module, args):
        self.inputs.append(args[0].detach().clone())

    def _post(self, module, args, out):
        self.inputs.append(args[0].detach().clone())
        self.outputs.append(out.detach().clone())

    @property
    def calls(self):
        return len(self.inputs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# =================================================================================================
# 1. Every registered model
# =================================================================================================

def test_registered_names():
    assert set(nk.NOISY_MODELS) == EXPECTED_NAMES
    assert set(timm.list_models("noisy_*")) == EXPECTED_NAMES
    for name in EXPECTED_NAMES:
        assert base_model_name(name) == name[len("noisy_"):]
        assert timm.is_model(name)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_registered_model_forward_backward_default_noise(name):
    kw, shape = tiny_kwargs(name)
    model = timm.create_model(name, **kw)
    assert noise_config(model) == NoiseConfig()
    mods = noise_modules(model)
    assert len(mods) == 1
    # default: optimal noise at the input of the last block
    assert mods[0][1] is model_blocks(model)[-1].noisynn
    assert mods[0][1].config == NoiseConfig()
    model.train()
    x = torch.randn(shape, requires_grad=True)
    with Record(mods[0][1]) as rec:
        y = model(x)
    assert rec.calls == 1
    assert y.shape == (shape[0], 10)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_registered_model_state_dict_and_outputs_match_plain(name):
    kw, shape = tiny_kwargs(name)
    plain = timm.create_model(base_model_name(name), **kw).eval()
    noisy = timm.create_model(name, **kw).eval()
    assert list(noisy.state_dict().keys()) == list(plain.state_dict().keys())
    assert [n for n, _ in noisy.named_parameters()] == [n for n, _ in plain.named_parameters()]

    # plain -> noisy and noisy -> plain, strict
    noisy.load_state_dict(plain.state_dict(), strict=True)
    other = timm.create_model(base_model_name(name), **kw).eval()
    other.load_state_dict(noisy.state_dict(), strict=True)
    for (k, a), (_, b) in zip(plain.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k

    x = torch.randn(shape)
    with torch.no_grad():
        ref = plain(x)
        assert differs(noisy(x), ref), "the default noise should change the output"
        apply_noisynn(noisy, "identity")
        assert noise_config(noisy) == NoiseConfig(kind="identity")
        torch.testing.assert_close(noisy(x), ref, rtol=0, atol=0)

        off = timm.create_model(name, noise=False, **kw).eval()
        assert noise_config(off) is None and noise_modules(off) == []
        assert list(off.state_dict().keys()) == list(plain.state_dict().keys())
        off.load_state_dict(plain.state_dict(), strict=True)
        torch.testing.assert_close(off(x), ref, rtol=0, atol=0)


# =================================================================================================
# 2. The noise argument and pretrained cfgs
# =================================================================================================

@pytest.mark.parametrize("noise, expected", [
    (NoiseConfig(kind="shift", alpha=0.2, layer=0), NoiseConfig(kind="shift", alpha=0.2, layer=0)),
    (dict(kind="shift", alpha=0.2, layer=0), NoiseConfig(kind="shift", alpha=0.2, layer=0)),
    ("shift", NoiseConfig(kind="shift")),
    ("optimal", NoiseConfig()),
    (dict(kind="gaussian", position="image", seed=1), NoiseConfig(kind="gaussian", position="image", seed=1)),
    (False, None),
], ids=["config", "dict", "str-shift", "str-optimal", "dict-image", "false"])
def test_create_model_noise_forms(noise, expected):
    model = timm.create_model(VIT, noise=noise, **vit_kw())
    assert noise_config(model) == expected
    mods = noise_modules(model)
    if expected is None:
        assert mods == []
        return
    assert len(mods) == 1
    site = {"block_input": lambda: model.blocks[expected.layer].noisynn,
            "image": lambda: model.noisynn}[expected.position]()
    assert mods[0][1] is site
    assert site.config == expected
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_create_model_resnet_noise_forms():
    m = timm.create_model(RESNET, noise=dict(kind="shift", axis="rows", layer=2), **RESNET_KW)
    assert noise_config(m) == NoiseConfig(kind="shift", axis="rows", layer=2)
    assert m.layer2[0].noisynn is noise_modules(m)[0][1]  # blocks: layer1[0], layer1[1], layer2[0], ...
    assert noise_config(timm.create_model(RESNET, noise=False, **RESNET_KW)) is None


@pytest.mark.parametrize("bad", [dict(kind="bogus"), dict(nope=1), 3, dict(axis="columns"), dict(position="head")])
def test_create_model_bad_noise_raises(bad):
    with pytest.raises(ConfigError):
        timm.create_model(VIT, noise=bad, **vit_kw())


def test_pretrained_cfg_lookup_same_hub_id():
    noisy = timm.models.get_pretrained_cfg("noisy_vit_base_patch16_224")
    plain = timm.models.get_pretrained_cfg("vit_base_patch16_224")
    assert noisy is not None and plain is not None
    assert noisy.hf_hub_id and noisy.hf_hub_id == plain.hf_hub_id


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_pretrained_cfgs_mirror_base(name):
    base = base_model_name(name)
    n_cfg = timm.models.get_pretrained_cfg(name)
    b_cfg = timm.models.get_pretrained_cfg(base)
    for field in ("hf_hub_id", "url", "input_size", "mean", "std", "num_classes", "crop_pct", "interpolation",
                  "first_conv", "classifier", "tag"):
        assert getattr(n_cfg, field) == getattr(b_cfg, field), field
    n_tags = {k.split(".", 1)[1] for k in timm.models.get_arch_pretrained_cfgs(name) if "." in k}
    b_tags = {k.split(".", 1)[1] for k in timm.models.get_arch_pretrained_cfgs(base) if "." in k}
    assert n_tags == b_tags and n_tags
    for tag in b_tags:
        assert (timm.models.get_pretrained_cfg(f"{name}.{tag}").hf_hub_id
                == timm.models.get_pretrained_cfg(f"{base}.{tag}").hf_hub_id)


def test_tagged_name_uses_base_tag_cfg_and_data_config():
    tag = "augreg_in21k"
    noisy = timm.create_model(f"noisy_vit_base_patch16_224.{tag}", img_size=32, depth=1, num_classes=10)
    plain = timm.create_model(f"vit_base_patch16_224.{tag}", img_size=32, depth=1, num_classes=10)
    assert noise_config(noisy) == NoiseConfig()
    assert noisy.pretrained_cfg["hf_hub_id"] == plain.pretrained_cfg["hf_hub_id"]
    assert timm.data.resolve_model_data_config(noisy) == timm.data.resolve_model_data_config(plain)


# =================================================================================================
# 3. Noise active exactly in the configured modes, at the configured site
# =================================================================================================

def _site(model, position, layer):
    if position == "block_input":
        return model_blocks(model)[layer].noisynn
    if position == "attn_input":
        return model.blocks[layer].norm1.noisynn
    return model.noisynn


MODES = [dict(train=True, eval=False), dict(train=False, eval=True)]


@pytest.mark.parametrize("modes", MODES, ids=["train-only", "eval-only"])
@pytest.mark.parametrize("position", ["block_input", "attn_input", "image"])
def test_vit_noise_modes_and_site(position, modes):
    cfg = NoiseConfig(kind="optimal", axis="tokens", position=position, layer=-1, **modes)
    plain, noisy = make_pair(VIT, noise=cfg, **vit_kw(depth=2))
    mods = noise_modules(noisy)
    assert len(mods) == 1
    site = _site(noisy, position, -1)
    assert mods[0][1] is site
    assert site.prefix_tokens == (0 if position == "image" else 1)
    x = torch.randn(3, 3, 32, 32)
    expected_shape = (3, 3, 32, 32) if position == "image" else (3, 1 + 4, 192)
    with torch.no_grad(), Record(site) as rec:
        for train in (False, True):
            plain.train(train)
            noisy.train(train)
            assert site.training == train
            y_plain, y_noisy = plain(x), noisy(x)
            on = modes["train"] if train else modes["eval"]
            if on:
                assert differs(y_noisy, y_plain)
                assert differs(rec.outputs[-1], rec.inputs[-1])
            else:
                torch.testing.assert_close(y_noisy, y_plain, rtol=0, atol=0)
                assert torch.equal(rec.outputs[-1], rec.inputs[-1])
    assert rec.calls == 2  # once per forward
    assert all(t.shape == expected_shape for t in rec.inputs)


@pytest.mark.parametrize("modes", MODES, ids=["train-only", "eval-only"])
@pytest.mark.parametrize("position", ["block_input", "image"])
def test_resnet_noise_modes_and_site(position, modes):
    cfg = NoiseConfig(kind="shift", axis="rows", position=position, layer=-1, **modes)
    plain, noisy = make_pair(RESNET, noise=cfg, **RESNET_KW)
    site = _site(noisy, position, -1)
    if position == "block_input":
        assert site is noisy.layer4[-1].noisynn
    assert [m for _, m in noise_modules(noisy)] == [site]
    x = torch.randn(2, 3, 64, 64)
    expected_shape = (2, 3, 64, 64) if position == "image" else (2, 512, 2, 2)
    with torch.no_grad(), Record(site) as rec:
        for train in (False, True):
            plain.train(train)
            noisy.train(train)
            y_plain, y_noisy = plain(x), noisy(x)
            if modes["train"] if train else modes["eval"]:
                assert differs(y_noisy, y_plain)
            else:
                torch.testing.assert_close(y_noisy, y_plain, rtol=0, atol=0)
    assert rec.calls == 2
    assert all(t.shape == expected_shape for t in rec.inputs)


@pytest.mark.parametrize("position", ["block_input", "attn_input"])
@pytest.mark.parametrize("layer, index", [(0, 0), (1, 1), (2, 2), (-1, 2), (-2, 1), (-3, 0)])
def test_layer_index_positive_and_negative(position, layer, index):
    depth = 3
    plain, noisy = make_pair(VIT, noise=dict(position=position, layer=layer), **vit_kw(depth=depth))
    mods = noise_modules(noisy)
    assert len(mods) == 1
    site = _site(noisy, position, index)
    assert mods[0][1] is site
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), Record(site) as rec:
        noisy(x)
    assert rec.calls == 1 and rec.inputs[0].shape == (2, 5, 192)
    # the same block as the opposite-sign index
    other = index - depth if layer >= 0 else index
    twin = timm.create_model(VIT, noise=dict(position=position, layer=other), **vit_kw(depth=depth)).eval()
    twin.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), noisy(x), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [3, -4, 100, -100])
@pytest.mark.parametrize("position", ["block_input", "attn_input"])
def test_layer_out_of_range_raises(layer, position):
    with pytest.raises(ConfigError):
        timm.create_model(VIT, noise=dict(layer=layer, position=position), **vit_kw(depth=3))
    plain = timm.create_model("vit_tiny_patch16_224", **vit_kw(depth=3))
    with pytest.raises(ConfigError):
        apply_noisynn(plain, dict(layer=layer, position=position))
    assert noise_config(plain) is None and noise_modules(plain) == []


def test_resnet_layer_range():
    # resnet18 has 8 blocks (2 per stage)
    for layer, (stage, i) in [(0, (1, 0)), (7, (4, 1)), (-8, (1, 0)), (-3, (3, 1))]:
        m = timm.create_model(RESNET, noise=dict(layer=layer), **RESNET_KW)
        assert noise_modules(m)[0][1] is getattr(m, f"layer{stage}")[i].noisynn
    for layer in (8, -9):
        with pytest.raises(ConfigError):
            timm.create_model(RESNET, noise=dict(layer=layer), **RESNET_KW)


def test_noise_follows_mode_set_before_apply():
    # a model already in eval mode: noise module must be in eval mode too
    plain = timm.create_model("vit_tiny_patch16_224", **vit_kw()).eval()
    ref = copy.deepcopy(plain)
    apply_noisynn(plain, dict(train=True, eval=False))
    assert plain.blocks[-1].noisynn.training is False
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref(x), rtol=0, atol=0)


# =================================================================================================
# 4. Exactness of the noise at the site
# =================================================================================================

@pytest.mark.parametrize("layer", [0, 1, -1])
def test_vit_block_input_noise_is_exact(layer):
    plain, noisy = make_pair(VIT, noise=dict(kind="optimal", axis="tokens", layer=layer), **vit_kw(depth=3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with Record(plain.blocks[layer], pre=True) as p_rec:
            plain(x)
        # registered after the noise's pre-hook, so it sees what the block receives
        with Record(noisy.blocks[layer], pre=True) as n_rec, Record(noisy.blocks[layer].norm1, pre=True) as ln_rec:
            noisy(x)
    clean, got = p_rec.inputs[0], n_rec.inputs[0]
    expected = linear_transform_noise(clean, "optimal", axis="tokens", prefix_tokens=noisy.num_prefix_tokens)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ln_rec.inputs[0], expected, rtol=1e-6, atol=1e-6)
    # by hand: y_i = (x_i + sum_j x_j) / (k + 1) over the k patch tokens, class token untouched
    patches = clean[:, 1:]
    k = patches.shape[1]
    torch.testing.assert_close(got[:, 1:], (patches + patches.sum(1, keepdim=True)) / (k + 1), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[:, :1], clean[:, :1])
    assert differs(got, clean)


def test_vit_attn_input_noise_is_exact_and_residual_untouched():
    # non-square patch grid (2, 4): axis='rows' must use the model's grid
    kw = dict(img_size=(32, 64), depth=2, num_classes=10)
    plain, noisy = make_pair(VIT, noise=dict(kind="shift", axis="rows", alpha=0.25, position="attn_input", layer=1),
                             **kw)
    assert noisy.blocks[1].norm1.noisynn.grid == (2, 4)
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        with Record(plain.blocks[1].norm1) as p_ln, Record(plain.blocks[1], pre=True) as p_blk:
            y_plain = plain(x)
        with Record(noisy.blocks[1].attn, pre=True) as n_attn, Record(noisy.blocks[1], pre=True) as n_blk:
            y_noisy = noisy(x)
    expected = linear_transform_noise(p_ln.outputs[0], "shift", axis="rows", alpha=0.25, prefix_tokens=1, grid=(2, 4))
    torch.testing.assert_close(n_attn.inputs[0], expected, rtol=1e-6, atol=1e-6)
    assert differs(n_attn.inputs[0], p_ln.outputs[0])
    # attn_input noise leaves the residual stream entering the block as it was
    torch.testing.assert_close(n_blk.inputs[0], p_blk.inputs[0], rtol=0, atol=0)
    assert differs(y_noisy, y_plain)


def test_resnet_block_input_noise_is_exact():
    plain, noisy = make_pair(RESNET, noise=dict(kind="shift", axis="rows", alpha=0.4, layer=-1), **RESNET_KW)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with Record(plain.layer4[-1], pre=True) as p_rec:
            plain(x)
        with Record(noisy.layer4[-1], pre=True) as n_rec, Record(noisy.layer4[-1].conv1, pre=True) as c_rec:
            noisy(x)
    expected = linear_transform_noise(p_rec.inputs[0], "shift", axis="rows", alpha=0.4)
    torch.testing.assert_close(n_rec.inputs[0], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_rec.inputs[0], expected, rtol=1e-6, atol=1e-6)
    assert differs(expected, p_rec.inputs[0])


def test_vit_image_noise_is_exact():
    plain, noisy = make_pair(VIT, noise=dict(kind="optimal", axis="rows", position="image"), **vit_kw())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), Record(noisy.patch_embed, pre=True) as rec:
        y_noisy = noisy(x)
        y_ref = plain(linear_transform_noise(x, "optimal", axis="rows"))
    torch.testing.assert_close(rec.inputs[0], linear_transform_noise(x, "optimal", axis="rows"), rtol=0, atol=0)
    torch.testing.assert_close(y_noisy, y_ref, rtol=1e-6, atol=1e-6)


# =================================================================================================
# 5. apply_noisynn / remove_noisynn on plain timm models
# =================================================================================================

PLAIN_MODELS = [
    ("vit_tiny_patch16_224", vit_kw(), 32),
    ("deit_tiny_patch16_224", vit_kw(), 32),
    ("deit_tiny_distilled_patch16_224", vit_kw(), 32),
    ("resnet18", dict(RESNET_KW), 64),
    ("convnext_atto", dict(num_classes=10), 64),
]
PLAIN_IDS = [m[0] for m in PLAIN_MODELS]


@pytest.mark.parametrize("name, kw, size", PLAIN_MODELS, ids=PLAIN_IDS)
def test_apply_remove_roundtrip(name, kw, size):
    model = timm.create_model(name, **kw).eval()
    modules_before = [(n, m) for n, m in model.named_modules()]
    keys_before = list(model.state_dict().keys())
    hooks_before = hook_count(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y_before = model(x)
        # layer 0: at the last block the mean-preserving mix is near-invisible in ConvNeXt (layer scale 1e-6)
        assert apply_noisynn(model, dict(layer=0)) is model
        assert noise_config(model) == NoiseConfig(layer=0)
        assert list(model.state_dict().keys()) == keys_before
        assert len(noise_modules(model)) == 1
        assert noise_modules(model)[0][1] is model_blocks(model)[0].noisynn
        assert differs(model(x), y_before)
        assert remove_noisynn(model) is model
        assert noise_config(model) is None
        assert [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in modules_before]
        assert list(model.state_dict().keys()) == keys_before
        assert hook_count(model) == hooks_before
        assert torch.equal(model(x), y_before)
        # removing again is a no-op
        assert remove_noisynn(model) is model
        assert torch.equal(model(x), y_before)


@pytest.mark.parametrize("name, kw, size", PLAIN_MODELS, ids=PLAIN_IDS)
def test_apply_twice_replaces(name, kw, size):
    model = timm.create_model(name, **kw).eval()
    fresh = copy.deepcopy(model)
    hooks_before = hook_count(model)
    apply_noisynn(model, dict(kind="optimal", layer=0))
    apply_noisynn(model, dict(kind="shift", axis="rows", layer=1))
    mods = noise_modules(model)
    assert len(mods) == 1
    assert mods[0][1] is model_blocks(model)[1].noisynn
    assert not hasattr(model_blocks(model)[0], "noisynn")
    assert noise_config(model) == NoiseConfig(kind="shift", axis="rows", layer=1)
    assert hook_count(model) == hooks_before + 1
    apply_noisynn(fresh, dict(kind="shift", axis="rows", layer=1))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)
    # same config twice: still one noise
    apply_noisynn(model, dict(kind="shift", axis="rows", layer=1))
    assert len(noise_modules(model)) == 1 and hook_count(model) == hooks_before + 1


@pytest.mark.parametrize("name, prefix", [("deit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_deit_prefix_tokens_untouched_attn_input(name, prefix):
    model = timm.create_model(name, **vit_kw()).eval()
    assert model.num_prefix_tokens == prefix
    apply_noisynn(model, dict(kind="optimal", axis="tokens", position="attn_input", layer=0))
    site = model.blocks[0].norm1.noisynn
    assert site.prefix_tokens == prefix
    with torch.no_grad(), Record(site) as rec:
        model(torch.randn(2, 3, 32, 32))
    inp, out = rec.inputs[0], rec.outputs[0]
    assert inp.shape == (2, prefix + 4, 192)
    assert torch.equal(out[:, :prefix], inp[:, :prefix])  # class (and distillation) token untouched
    assert differs(out[:, prefix:], inp[:, prefix:])
    patches = inp[:, prefix:]
    torch.testing.assert_close(out[:, prefix:], (patches + patches.sum(1, keepdim=True)) / (patches.shape[1] + 1),
                               rtol=1e-6, atol=1e-6)


def _unsupported_models():
    yield "linear", nn.Linear(4, 4)
    yield "sequential", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    for name in ("mobilenetv3_small_050", "swinv2_cr_tiny_ns_224"):
        yield name, timm.create_model(name, num_classes=10)


def test_unsupported_models_raise():
    for label, model in _unsupported_models():
        with pytest.raises(UnsupportedModelError):
            apply_noisynn(model)
        assert noise_config(model) is None, label
        assert noise_modules(model) == [], label


@pytest.mark.parametrize("name, kw", [("resnet18", RESNET_KW), ("convnext_atto", dict(num_classes=10))])
def test_attn_input_on_cnn_raises(name, kw):
    model = timm.create_model(name, **kw)
    with pytest.raises(UnsupportedModelError):
        apply_noisynn(model, dict(position="attn_input"))
    assert noise_config(model) is None and noise_modules(model) == []


def test_attn_input_on_registered_resnet_raises():
    with pytest.raises(UnsupportedModelError):
        timm.create_model(RESNET, noise=dict(position="attn_input"), **RESNET_KW)


def test_failed_apply_keeps_previous_noise():
    """A rejected config must not strip the noise the model already had (apply is all-or-nothing)."""
    model = timm.create_model("vit_tiny_patch16_224", **vit_kw(depth=2))
    apply_noisynn(model, dict(kind="shift", layer=0))
    with pytest.raises(ConfigError):
        apply_noisynn(model, dict(layer=5))
    assert noise_config(model) == NoiseConfig(kind="shift", layer=0)
    assert len(noise_modules(model)) == 1


def test_apply_default_and_kind_name():
    model = timm.create_model("resnet18", **RESNET_KW)
    apply_noisynn(model)
    assert noise_config(model) == NoiseConfig()
    assert noise_modules(model)[0][1] is model.layer4[-1].noisynn
    apply_noisynn(model, "shift")
    assert noise_config(model) == NoiseConfig(kind="shift")


# =================================================================================================
# 6. Batch dependence guard at model level
# =================================================================================================

def test_batch_axis_in_eval_needs_opt_in():
    with pytest.raises(BatchDependenceError):
        timm.create_model(VIT, noise=dict(axis="batch"), **vit_kw())
    with pytest.raises(BatchDependenceError):
        timm.create_model(RESNET, noise=dict(kind="shift", axis="batch", eval=True), **RESNET_KW)
    with pytest.raises(BatchDependenceError):
        NoiseConfig.official_vit()
    with pytest.raises(BatchDependenceError):
        NoiseConfig.official_cnn()
    plain = timm.create_model("vit_tiny_patch16_224", **vit_kw())
    with pytest.raises(BatchDependenceError):
        apply_noisynn(plain, dict(axis="batch"))
    assert noise_config(plain) is None and noise_modules(plain) == []
    # training-only batch mixing needs no opt-in
    m = timm.create_model(VIT, noise=dict(axis="batch", eval=False), **vit_kw())
    assert noise_config(m).axis == "batch"


def _sample0(model, x, x_other):
    with torch.no_grad():
        return model(x)[0], model(x_other)[0]


@pytest.mark.parametrize("position", ["block_input", "attn_input", "image"])
def test_batch_axis_opt_in_mixes_in_eval(position):
    cfg = NoiseConfig(kind="optimal", axis="batch", position=position, allow_batch_dependence=True)
    plain, noisy = make_pair(VIT, noise=cfg, **vit_kw())
    x = torch.randn(3, 3, 32, 32)
    x2 = x.clone()
    x2[1] = torch.randn(3, 32, 32)
    a, b = _sample0(noisy, x, x2)
    assert differs(a, b), "batch-axis noise in eval must make sample 0 depend on sample 1"
    pa, pb = _sample0(plain, x, x2)
    torch.testing.assert_close(pa, pb)
    # batch of one: optimal mixing over k = 1 is the identity
    with torch.no_grad():
        torch.testing.assert_close(noisy(x[:1]), plain(x[:1]), rtol=1e-6, atol=1e-6)


def test_official_protocols_with_opt_in():
    plain, noisy = make_pair(VIT, noise=NoiseConfig.official_vit(allow_batch_dependence=True), **vit_kw())
    assert noisy.blocks[-1].norm1.noisynn is noise_modules(noisy)[0][1]
    x = torch.randn(3, 3, 32, 32)
    x2 = x.clone()
    x2[2] = -x2[2]
    a, b = _sample0(noisy, x, x2)
    assert differs(a, b)
    noisy.train()
    plain.train()
    with torch.no_grad():  # official ViT: off in training
        torch.testing.assert_close(noisy(x), plain(x), rtol=0, atol=0)

    rplain, rnoisy = make_pair(RESNET, noise=NoiseConfig.official_cnn(allow_batch_dependence=True), **RESNET_KW)
    xr = torch.randn(3, 3, 64, 64)
    xr2 = xr.clone()
    xr2[1] = torch.randn(3, 64, 64)  # the official shift: y_0 = (1 - a) x_0 + a x_1
    a, b = _sample0(rnoisy, xr, xr2)
    assert differs(a, b)
    pa, pb = _sample0(rplain, xr, xr2)
    torch.testing.assert_close(pa, pb)


def test_batch_axis_train_only():
    plain, noisy = make_pair(VIT, noise=dict(axis="batch", eval=False), **vit_kw())
    x = torch.randn(3, 3, 32, 32)
    x2 = x.clone()
    x2[1] = torch.randn(3, 32, 32)
    a, b = _sample0(noisy, x, x2)
    torch.testing.assert_close(a, b)  # eval: no mixing
    noisy.train()
    a, b = _sample0(noisy, x, x2)
    assert differs(a, b)  # train: mixes


@pytest.mark.parametrize("axis", ["tokens", "rows"])
@pytest.mark.parametrize("position", ["block_input", "attn_input", "image"])
def test_sample_local_axes_do_not_mix_batch(position, axis):
    plain, noisy = make_pair(VIT, noise=dict(kind="optimal", axis=axis, position=position), **vit_kw())
    x = torch.randn(3, 3, 32, 32)
    x2 = x.clone()
    x2[1:] = torch.randn(2, 3, 32, 32)
    for train in (False, True):
        noisy.train(train)
        a, b = _sample0(noisy, x, x2)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(noisy(x[:1])[0], a, rtol=1e-5, atol=1e-6)
        assert differs(a, _sample0(plain, x, x2)[0])  # the noise is on


def test_sample_local_axis_resnet_eval():
    plain, noisy = make_pair(RESNET, noise=dict(kind="optimal", axis="tokens"), **RESNET_KW)
    x = torch.randn(3, 3, 64, 64)
    x2 = x.clone()
    x2[1:] = torch.randn(2, 3, 64, 64)
    a, b = _sample0(noisy, x, x2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert differs(a, _sample0(plain, x, x2)[0])


# =================================================================================================
# 7. Random kinds in models
# =================================================================================================

RANDOM_CFGS = [
    dict(kind="gaussian", strength=0.5, seed=7),
    dict(kind="salt_and_pepper", p=0.3, seed=7),
]


@pytest.mark.parametrize("cfg", RANDOM_CFGS, ids=["gaussian", "salt_and_pepper"])
def test_random_kinds_seeded_reproducible(cfg):
    plain, a = make_pair(VIT, noise=cfg, **vit_kw())
    b = timm.create_model(VIT, noise=cfg, **vit_kw())
    b.load_state_dict(plain.state_dict(), strict=True)
    other = timm.create_model(VIT, noise=dict(cfg, seed=8), **vit_kw())
    other.load_state_dict(plain.state_dict(), strict=True)
    for m in (plain, a, b, other):
        m.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ya1, yb1 = a(x), b(x)
        torch.testing.assert_close(ya1, yb1, rtol=0, atol=0)
        assert differs(ya1, plain(x))
        assert differs(other(x), ya1)  # a different seed, a different draw
        ya2, yb2 = a(x), b(x)
        torch.testing.assert_close(ya2, yb2, rtol=0, atol=0)
        assert differs(ya2, ya1)  # the generator moves on
        a.blocks[-1].noisynn.reset_generator()
        torch.testing.assert_close(a(x), ya1, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", RANDOM_CFGS, ids=["gaussian", "salt_and_pepper"])
def test_random_kinds_class_token_untouched(cfg):
    model = timm.create_model(VIT, noise=dict(cfg, layer=0), **vit_kw()).train()
    site = model.blocks[0].noisynn
    with torch.no_grad(), Record(site) as rec:
        model(torch.randn(2, 3, 32, 32))
    assert rec.calls == 1
    inp, out = rec.inputs[0], rec.outputs[0]
    assert torch.equal(out[:, :1], inp[:, :1])
    assert differs(out[:, 1:], inp[:, 1:])
    if cfg["kind"] == "salt_and_pepper":  # each sample's own patch-token extremes (the default value_range)
        for b in range(inp.shape[0]):
            body, changed = inp[b, 1:], out[b, 1:] != inp[b, 1:]
            vals = out[b, 1:][changed]
            assert torch.all((vals == body.max()) | (vals == body.min()))


def test_salt_and_pepper_image_level_pixel_range():
    model = timm.create_model(RESNET, noise=dict(kind="salt_and_pepper", p=0.2, low=0.0, high=1.0,
                                                 position="image", seed=0), **RESNET_KW).train()
    x = torch.rand(2, 3, 64, 64) * 0.5 + 0.25
    with torch.no_grad(), Record(model.noisynn) as rec:
        model(x)
    out = rec.outputs[0]
    changed = out != x
    frac = changed.float().mean().item()
    assert 0.1 < frac < 0.3
    assert torch.all((out[changed] == 0.0) | (out[changed] == 1.0))


# =================================================================================================
# 8. dtype, dense kind, deepcopy
# =================================================================================================

def test_dense_buffer_follows_to_and_matches_shift():
    k = 4  # patch tokens of a 32 px ViT/16
    q = nk.quality.shift(k, 0.25, dtype=torch.float32)
    plain, dense = make_pair(VIT, noise=dict(kind="dense", matrix=q), **vit_kw())
    site = dense.blocks[-1].noisynn
    assert site.quality_matrix.dtype == torch.float32
    assert "quality_matrix" not in "".join(dense.state_dict().keys())
    shift = timm.create_model(VIT, noise=dict(kind="shift", alpha=0.25), **vit_kw()).eval()
    shift.load_state_dict(plain.state_dict(), strict=True)
    dense.to(torch.float64)
    shift.to(torch.float64)
    assert site.quality_matrix.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in dense.parameters())
    assert noise_config(dense).matrix.dtype == torch.float32  # the config is left as given
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), Record(site) as rec:
        y = dense(x)
    assert y.dtype == torch.float64 and torch.isfinite(y).all()
    assert rec.outputs[0].dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(y, shift(x), rtol=1e-10, atol=1e-12)
        assert differs(y, plain.to(torch.float64)(x))


def test_to_float64_default_noise():
    model = timm.create_model(VIT, **vit_kw()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y32 = model(x)
        model.to(torch.float64)
        y64 = model(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-4, atol=1e-5)


def test_deepcopy_keeps_noise():
    plain, noisy = make_pair(VIT, noise=dict(kind="shift", axis="rows", layer=0), **vit_kw())
    dup = copy.deepcopy(noisy)
    assert noise_config(dup) == noise_config(noisy)
    mods = noise_modules(dup)
    assert len(mods) == 1 and mods[0][0] == "blocks.0.noisynn"
    assert mods[0][1] is dup.blocks[0].noisynn and mods[0][1] is not noisy.blocks[0].noisynn
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = noisy(x)
        with Record(dup.blocks[0].noisynn) as rec:
            torch.testing.assert_close(dup(x), y, rtol=0, atol=0)
            assert rec.calls == 1
            noisy(x)
            assert rec.calls == 1  # the copy's noise is its own
        assert differs(y, plain(x))
        # removing from the copy leaves the original noisy
        remove_noisynn(dup)
        assert noise_modules(dup) == [] and noise_config(dup) is None
        torch.testing.assert_close(dup(x), plain(x), rtol=0, atol=0)
        torch.testing.assert_close(noisy(x), y, rtol=0, atol=0)
        assert noise_config(noisy) is not None


def test_deepcopy_dense_float64_and_seeded_random():
    q = nk.quality.optimal(4)
    m = timm.create_model(VIT, noise=dict(kind="dense", matrix=q), **vit_kw()).eval().to(torch.float64)
    dup = copy.deepcopy(m)
    assert dup.blocks[-1].noisynn.quality_matrix.dtype == torch.float64
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dup(x), m(x), rtol=0, atol=0)

    r = timm.create_model(VIT, noise=dict(kind="gaussian", seed=3), **vit_kw()).train()
    with torch.no_grad():
        r(torch.randn(2, 3, 32, 32))  # creates the module's generator
        rdup = copy.deepcopy(r)
        assert noise_config(rdup) == NoiseConfig(kind="gaussian", seed=3)
        rdup.blocks[-1].noisynn.reset_generator()
        r.blocks[-1].noisynn.reset_generator()
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(rdup(x), r(x), rtol=0, atol=0)
