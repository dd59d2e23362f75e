"""apply_noisynn and swap_fused_ops over timm's transformer families, one table: ViT (class token;
register tokens with global average pooling), DeiT (also distilled), DeiT-3 (layer scale), EVA-02
(rotary embeddings, SwiGLU, ModuleList blocks), BEiT, CaiT (patch blocks; class-attention blocks
untouched) and Swin (windowed blocks on (B, H, W, C) stages).

For each: the noise sits where it should and changes the output; the swapped model matches the
unswapped one in outputs and gradients (fp32; the tolerance rule of tests/_oracle.py against the fp64
model, or, for random noise whose fp64 draws differ, against the unswapped fp32 model with the
triangle bound of that rule); unswap restores every class and the state_dict exactly.  Anything
else raises UnsupportedModelError naming the block type it met and what is supported."""

import copy

import pytest
import timm
import torch
from _oracle import ATOL, check
from torch import nn

import noisynn_kernels as nk
from noisynn_kernels import UnsupportedModelError
from noisynn_kernels.models import model_blocks
from noisynn_kernels.models.fused import grad_checkpointing_enabled

SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=5, drop_path_rate=0.0)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", SMALL, 32),
    "vit-reg-gap": ("vit_tiny_patch16_224", dict(SMALL, reg_tokens=2, class_token=False, global_pool="avg"), 32),
    "deit": ("deit_tiny_patch16_224", SMALL, 32),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", SMALL, 32),
    "deit3": ("deit3_small_patch16_224", dict(SMALL, init_values=0.5), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(SMALL, img_size=56, patch_size=14), 56),
    "beit": ("beit_base_patch16_224", dict(SMALL, init_values=0.5), 32),
    "cait": ("cait_xxs24_224", dict(SMALL, depth_token_only=1, init_values=0.5), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, window_size=4, embed_dim=24,
                                                  depths=(2, 2), num_heads=(2, 4), num_classes=5,
                                                  drop_path_rate=0.0), 32),
}
# (prefix tokens, (gh, gw)) at the noise site of each family's block 1 (Swin: stage 0, 8 x 8)
GEOMETRY = {"vit": (1, (4, 4)), "vit-reg-gap": (2, (4, 4)), "deit": (1, (4, 4)), "deit-distilled": (2, (4, 4)),
            "deit3": (1, (4, 4)), "eva02": (1, (4, 4)), "beit": (1, (4, 4)), "cait": (0, (4, 4)),
            "swin": (0, None)}
NOISES = {
    "optimal-tokens": dict(kind="optimal", axis="tokens", layer=1),
    "shift-rows-attn_input": dict(kind="shift", axis="rows", alpha=0.3, position="attn_input", layer=0),
    "optimal-rows-last": dict(kind="optimal", axis="rows", layer=-1),
    "gaussian-seeded": dict(kind="gaussian", seed=3, layer=1),
}


def make(family, noise=None):
    name, kw, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, **kw)
    with torch.no_grad():  # zero-init heads, small layer scales, near-uniform attention: make every part count
        for p in model.parameters():
            p.add_((0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.02) * torch.randn_like(p))
    if noise is not None:
        nk.apply_noisynn(model, noise)
    return model.train()


def image(family, batch=3, seed=1):
    size = FAMILIES[family][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def noise_sites(model):
    return [m for m in model.modules() if isinstance(m, nk.NoiseInjection)]


def reset(model):
    for m in noise_sites(model):
        m.reset_generator()


def run(model, x, g):
    reset(model)
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * g.to(y.dtype)).sum().backward()
    return y.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_puts_the_noise_at_its_site(family):
    plain = make(family).eval()
    x = image(family)
    for noise in NOISES.values():
        model = copy.deepcopy(plain)
        nk.apply_noisynn(model, dict(noise, eval=True))
        blk = model_blocks(model)[noise["layer"]]
        site = blk.norm1 if noise.get("position") == "attn_input" else blk
        assert noise_sites(model) == [site.noisynn]
        prefix, grid = GEOMETRY[family]
        if noise["layer"] == 1:
            assert (site.noisynn.prefix_tokens, site.noisynn.grid) == (prefix, grid)
        with torch.no_grad():
            assert not torch.allclose(model(x), plain(x), atol=1e-6), noise
        nk.remove_noisynn(model)
        assert noise_sites(model) == []
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("axis", ["tokens", "rows"])
def test_swin_noise_mixes_a_stage_positions_or_rows(axis):
    """Swin's (B, H, W, C) block input: ``tokens`` mixes the H*W positions of the stage, ``rows`` its H
    rows (optimal noise: each row becomes the mean of itself and the sum over the k mixed rows)."""
    model = make("swin").eval()
    blk = model_blocks(model)[1]
    seen = []
    blk.register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # before the noise hook: clean input
    nk.apply_noisynn(model, dict(kind="optimal", axis=axis, layer=1))
    blk.register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # after it: the noisy input
    with torch.no_grad():
        model(image("swin"))
    clean, noisy = seen
    B, H, W, C = clean.shape
    assert (H, W) == (8, 8)
    if axis == "tokens":
        t = clean.reshape(B, H * W, C)
        expected = ((t + t.sum(1, keepdim=True)) / (H * W + 1)).reshape(B, H, W, C)
    else:
        expected = (clean + clean.sum(1, keepdim=True)) / (H + 1)
    torch.testing.assert_close(noisy, expected, rtol=1e-5, atol=1e-6)


def _fp64_twin(model):
    return copy.deepcopy(model).double()


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("family", FAMILIES)
def test_swap_matches_outputs_and_gradients(family, noise):
    _check_swap(family, noise, "reference")


@pytest.mark.parametrize("family", FAMILIES)
def test_swap_matches_with_the_device_default_backend(family):
    """The same through the backend a swapped model takes by default (the compiled C++ kernels on a CPU
    where they are built, the reference otherwise)."""
    _check_swap(family, "shift-rows-attn_input", None)


def _check_swap(family, noise, backend):
    plain = make(family, NOISES[noise])
    fused = nk.swap_fused_ops(copy.deepcopy(plain), backend=backend)
    assert nk.is_swapped(fused) and list(fused.state_dict()) == list(plain.state_dict())
    x = image(family)
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    y, grads = run(fused, x, g)
    y32, grads32 = run(plain, x, g)
    if NOISES[noise]["kind"] == "gaussian":
        # fp64 draws differ from fp32 ones: measure PyTorch's own fp32 error on the noiseless model, and
        # bound |fused - plain| <= |fused - truth| + |plain - truth| by 3 times it + atol
        clean = make(family)
        y_c, g_c = run(clean, x, g)
        y64, g64 = run(_fp64_twin(clean), x.double(), g)
        tol = 3 * (y_c.double() - y64).abs().max().item() + ATOL[torch.float32]
        assert (y - y32).abs().max().item() <= tol
        for n in grads32:
            tol = 3 * (g_c[n].double() - g64[n]).abs().max().item() + ATOL[torch.float32]
            assert (grads[n] - grads32[n]).abs().max().item() <= tol, f"grad of {n}"
        assert not torch.allclose(y, y_c, atol=1e-4)  # the noise is there
    else:
        y64, grads64 = run(_fp64_twin(plain), x.double(), g)
        check(y, y64, y32, ATOL[torch.float32], "output")
        assert grads.keys() == grads32.keys() == grads64.keys()
        for n in grads64:
            check(grads[n], grads64[n], grads32[n], ATOL[torch.float32], f"grad of {n}")
    plain.eval(), fused.eval()
    with torch.no_grad():
        reset(plain), reset(fused)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_swap_runs_the_fused_op_and_unswap_is_exact(family, monkeypatch):
    from noisynn_kernels.ops import mix_add_layernorm as op

    model = make(family, NOISES["optimal-tokens"])
    before = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model).eval()
    nk.swap_fused_ops(model, backend="reference")
    assert all(type(m).__name__.startswith("Fused") for m in model_blocks(model))
    calls = []
    real = op.LAUNCHERS["reference"]
    monkeypatch.setitem(op.LAUNCHERS, "reference", lambda *a: calls.append(a[5].cfg.kind) or real(*a))
    with torch.no_grad():
        model.eval()(image(family))
    n_blocks = len(model_blocks(model))
    assert len(calls) == 2 * n_blocks and calls.count("optimal") == 1  # the noise folded into one of them
    monkeypatch.undo()
    nk.unswap_fused_ops(model)
    assert not nk.is_swapped(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        x = image(family)
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("family", ["swin", "eva02", "cait"])
def test_grad_checkpointing_per_family(family):
    """Checkpointing set before or after the swap: the fused blocks checkpoint themselves (the fused op
    runs again in backward) and the gradients equal those without checkpointing."""
    from noisynn_kernels.ops import mix_add_layernorm as op

    x, g = image(family), torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    ref = nk.swap_fused_ops(make(family, NOISES["gaussian-seeded"]), backend="reference")
    y0, g0 = run(ref, x, g)
    real = op.LAUNCHERS["reference"]
    for when in ("before", "after"):
        model = make(family, NOISES["gaussian-seeded"])
        if when == "before":
            model.set_grad_checkpointing(True)
        nk.swap_fused_ops(model, backend="reference")
        if when == "after":
            model.set_grad_checkpointing(True)
        assert grad_checkpointing_enabled(model)
        calls = []
        op.LAUNCHERS["reference"] = lambda *a, calls=calls: calls.append(1) or real(*a)
        try:
            y, grads = run(model, x, g)
        finally:
            op.LAUNCHERS["reference"] = real
        assert len(calls) == 2 * 2 * len(model_blocks(model)), when  # forward + recomputation
        torch.testing.assert_close(y, y0, rtol=0, atol=0)
        for n in g0:
            torch.testing.assert_close(grads[n], g0[n], rtol=0, atol=0, msg=f"{when}: grad of {n}")


def test_named_failures_of_the_issue():
    """apply_noisynn on swin_tiny_patch4_window7_224 and swap_fused_ops on eva02_tiny_patch14_224 (whose
    blocks are a ModuleList) used to raise; both work at their default widths and resolution (fewer blocks)."""
    swin = nk.apply_noisynn(timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, depths=(1, 1, 1, 1)))
    assert nk.noise_config(swin) is not None
    eva = nk.swap_fused_ops(timm.create_model("eva02_tiny_patch14_224", num_classes=3, depth=2), backend="reference")
    assert nk.is_swapped(eva) and isinstance(eva.blocks, nn.ModuleList)
    with torch.no_grad():
        assert swin.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 3)
        assert eva.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 3)


def _unsupported():
    yield "RelPosBlock", timm.create_model("vit_relpos_small_patch16_224", img_size=32, patch_size=8, depth=1)
    yield "EvaBlockPostNorm", timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=1, use_post_norm=True)
    yield "ResPostBlock", timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1,
                                            block_fn=timm.models.vision_transformer.ResPostBlock)
    yield "BasicBlock", timm.create_model("resnet18")
    yield "ConvNeXtBlock", timm.create_model("convnext_atto")


@pytest.mark.parametrize("expected, model", list(_unsupported()), ids=lambda v: v if isinstance(v, str) else "")
def test_unsupported_blocks_raise_naming_the_block_and_the_families(expected, model):
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(UnsupportedModelError, match=expected) as err:
        nk.swap_fused_ops(model)
    for family in ("ViT", "DeiT-3", "EVA", "BEiT", "CaiT", "Swin"):
        assert family in str(err.value)
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing half-swapped


@pytest.mark.parametrize("name", ["swinv2_cr_tiny_ns_224", "swinv2_tiny_window8_256"])
def test_unsupported_model_for_apply_names_the_families(name):
    """Swin V2 (post-norm blocks; the Cr variant has .stages of .blocks on (B, H, W, C) tokens, which a
    structural ConvNeXt check would take for feature maps) is not supported: a clear error, no noise."""
    model = timm.create_model(name, num_classes=3)
    with pytest.raises(UnsupportedModelError, match="Swin") as err:
        nk.apply_noisynn(model)
    assert type(model).__name__ in str(err.value) and nk.noise_config(model) is None
