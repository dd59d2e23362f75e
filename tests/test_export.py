"""TorchScript and torch.export: what works, and a clear error for what does not.

- ``torch.export.export`` of a noisy ViT in eval mode works, unswapped and swapped: the exported program
  gives the eager output and keeps the fused ``noisynn::`` op; random noise is drawn again at every call
  (never baked into the graph as a constant).
- ``torch.jit.trace`` works (fixed shapes).
- ``torch.jit.script`` cannot compile the noise module or the fused block stack: it raises
  :class:`~noisynn_kernels.UnsupportedModelError` that names the alternatives, instead of a TorchScript
  frontend error from deep inside the package.
"""

import pytest
import timm
import torch

import noisynn_kernels as nk
from noisynn_kernels import NoiseInjection, UnsupportedModelError
from noisynn_kernels._ext import select_backend

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                                        "ignore:`torch.jit.:FutureWarning")

CPU_OP = select_backend("cpu")  # the fused op a swapped model runs on CPU by default


def _tiny(noise):
    torch.manual_seed(0)
    return timm.create_model("noisy_vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                             num_heads=3, num_classes=5, noise=noise).eval()


def _targets(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))

LINEAR = [False, dict(kind="optimal", axis="tokens"), dict(kind="shift", axis="rows", position="attn_input"),
          dict(kind="optimal", axis="batch", allow_batch_dependence=True)]


@pytest.mark.parametrize("swapped", (False, True), ids=["unswapped", "swapped"])
@pytest.mark.parametrize("noise", LINEAR, ids=["none", "optimal-tokens", "shift-rows-attn", "optimal-batch"])
def test_export_noisy_vit_in_eval_mode(noise, swapped):
    model = _tiny(noise)
    if swapped:
        nk.swap_fused_ops(model)
    with torch.no_grad():
        eager = model(X)
        ep = torch.export.export(model, (X,))
        got = ep.module()(X)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    targets = _targets(ep)
    fused_ops = [t for t in targets if t.startswith("noisynn.")]
    if swapped and CPU_OP != "reference":
        # one fused add + LayerNorm per norm of the 2 blocks, the noise folded into one of them
        assert len(fused_ops) == 4, targets
    else:
        assert not fused_ops
    if noise:
        # the noise is in the exported graph: another input batch gives the eager (noisy) result too
        x2 = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x2), model(x2), rtol=1e-6, atol=1e-6)
            nk.remove_noisynn(model)
            assert not torch.allclose(ep.module()(x2), model(x2), atol=1e-4)


@pytest.mark.parametrize("noise", [dict(kind="gaussian", strength=0.5), dict(kind="salt_and_pepper", p=0.3),
                                   dict(kind="gaussian", strength=0.5, seed=4)],
                         ids=["gaussian", "snp", "gaussian-seed"])
def test_export_redraws_random_noise_at_every_call(noise):
    model = _tiny(noise)
    with torch.no_grad():
        ep = torch.export.export(model, (X,))
        a, b = ep.module()(X), ep.module()(X)
    assert not torch.allclose(a, b), "random noise must not be a constant of the exported program"
    assert any("rand" in t for t in _targets(ep))


def test_jit_trace_works_and_matches():
    model = _tiny(dict(kind="optimal", axis="tokens"))  # tracing used to fail: sizes came in as tensors
    with torch.no_grad():
        traced = torch.jit.trace(model, (X,), check_trace=False)
        torch.testing.assert_close(traced(X), model(X), rtol=1e-6, atol=1e-6)
    swapped = nk.swap_fused_ops(_tiny(dict(kind="shift", axis="rows")))
    with torch.no_grad():
        traced = torch.jit.trace(swapped, (X,), check_trace=False)
        torch.testing.assert_close(traced(X), swapped(X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("what", ["noise module", "noisy model", "swapped model without noise", "swapped noisy model"])
def test_jit_script_raises_a_clear_error(what):
    if what == "noise module":
        module = NoiseInjection(dict(kind="shift", axis="tokens"))
    else:
        module = _tiny(False if "without" in what else dict(kind="optimal"))
        if what.startswith("swapped"):
            nk.swap_fused_ops(module)
    with pytest.raises(UnsupportedModelError) as ei:
        torch.jit.script(module)
    msg = str(ei.value)
    assert "TorchScript" in msg and "torch.export.export" in msg and "torch.compile" in msg


def test_jit_script_of_a_plain_model_is_untouched():
    # the guard is on the package's modules only: a timm model without noise (or after unswap) scripts
    model = _tiny(False)
    nk.swap_fused_ops(model)
    nk.unswap_fused_ops(model)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(X), model(X), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# dynamic shapes: no graph break, no recompilation per batch size


DYNAMIC_NOISES = [dict(kind="optimal", axis="tokens"), dict(kind="shift", axis="rows"),
                  dict(kind="optimal", axis="batch", allow_batch_dependence=True),
                  dict(kind="shift", axis="rows", position="attn_input"),
                  dict(kind="optimal", axis="tokens", position="attn_output"),
                  dict(kind="gaussian"), dict(kind="salt_and_pepper")]
# (a seeded random noise draws from its own torch.Generator, which torch.compile cannot trace: there
# the graph breaks, see the README's guarantees)


def _compiled_over_batches(model, dynamic, batches):
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=dynamic, fullgraph=True, backend="eager")
    outs = []
    with torch.no_grad():
        first, rest = batches[:2] if dynamic is None else batches[:1], batches[2:] if dynamic is None else batches[1:]
        for b in first:  # automatic-dynamic mode: the second size compiles once more, with a dynamic batch
            outs.append((b, compiled(torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)))))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for b in rest:
                outs.append((b, compiled(torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)))))
    return outs


@pytest.mark.parametrize("noise", DYNAMIC_NOISES, ids=lambda n: "-".join(str(v) for v in n.values()))
@pytest.mark.parametrize("swapped", (False, True))
@pytest.mark.parametrize("dynamic", (True, None), ids=("dynamic", "automatic"))
def test_compile_with_dynamic_batch_has_no_graph_break_or_recompile(noise, swapped, dynamic):
    model = _tiny(noise)
    if swapped:
        nk.swap_fused_ops(model)
    random = noise["kind"] in ("gaussian", "salt_and_pepper")
    for b, y in _compiled_over_batches(model, dynamic, (2, 3, 5, 7)):
        assert y.shape == (b, 5)
        if not random:  # the random kinds draw again each call; the others must match eager exactly
            with torch.no_grad():
                expect = model(torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)))
            torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ("reference", CPU_OP))
def test_public_ops_compile_with_dynamic_shapes(backend):
    cfg = nk.NoiseConfig(kind="shift", axis="tokens")

    def f(x, r, q, w):
        normed, res = nk.mix_add_layernorm(x, r, w, None, mix=cfg, prefix_tokens=1, backend=backend)
        t = nk.linear_transform_noise(res, "optimal", axis="batch", prefix_tokens=1)
        a = nk.noisy_attention(q, q, q, mix="optimal", prefix_tokens=1)
        return normed + t, a

    torch._dynamo.reset()
    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="eager")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    for i, (B, N) in enumerate(((2, 9), (3, 17), (5, 33))):
        args = (torch.randn(B, N, 16, generator=g), torch.randn(B, N, 16, generator=g),
                torch.randn(B, 4, N, 8, generator=g), w)  # sizes distinct at the first call (no duck sizing)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(*args)
        for a, e in zip(got, f(*args)):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_export_with_a_dynamic_batch_dim():
    model = nk.swap_fused_ops(_tiny(dict(kind="optimal", axis="tokens")))
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(model, (torch.randn(4, 3, 32, 32),), dynamic_shapes=({0: batch},))
    for b in (2, 7):
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)
    if CPU_OP == "cpu":
        assert any("mix_add_layernorm_fwd_cpp" in t for t in _targets(ep))
