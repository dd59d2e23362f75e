"""swap_fused_ops: the fused block stack matches the timm model, keeps its state_dict, reverts exactly."""

import copy

import pytest
import timm
import torch

import noisynn_kernels as nk
from noisynn_kernels import BackendUnavailableError, UnsupportedModelError
from noisynn_kernels._ext import backend_status, select_backend
from noisynn_kernels.models.fused import is_swapped, swap_fused_ops, unswap_fused_ops

# The Triton backend runs here through the interpreter (conftest.py) or on a GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference"] + [b for b in ("triton", "cpu") if backend_status(b, DEVICE) is None]

NOISES = [
    False,
    dict(kind="optimal", axis="tokens"),
    dict(kind="shift", axis="rows", layer=1),
    dict(kind="optimal", axis="rows", position="attn_input"),
    dict(kind="shift", axis="rows", position="attn_output", layer=1),
    dict(kind="optimal", axis="tokens", position="attn_output"),
    dict(kind="shift", axis="batch", eval=False),
    dict(kind="gaussian", seed=3),
]


def _tiny(noise, **kw):
    torch.manual_seed(0)
    return timm.create_model("noisy_vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=48,
                             num_heads=3, num_classes=5, noise=noise, **kw).to(DEVICE)


def _tol(backend):
    # reference: the same PyTorch ops in another order -> bitwise or near; triton: fp32 kernels with
    # their own reduction order, within a few ulps of fp32 through a 3-block network.
    return dict(rtol=0, atol=0) if backend == "reference" else dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", NOISES, ids=lambda n: "none" if n is False else "-".join(map(str, n.values())))
def test_swapped_model_matches_outputs_and_gradients(noise, backend):
    plain = _tiny(noise).train()
    fused = copy.deepcopy(plain)
    swap_fused_ops(fused, backend=backend)
    assert is_swapped(fused) and list(fused.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    for m in (plain, fused):
        site = getattr(m.blocks[-1], "noisynn", None)
        if site is not None:
            site.reset_generator()
    ya, yb = plain(x), fused(x)
    torch.testing.assert_close(yb, ya, **_tol(backend))
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), (_, pb) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, **_tol(backend), msg=f"grad of {n}")
    plain.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), **_tol(backend))


def test_fused_stack_really_runs_the_op(monkeypatch):
    fused = swap_fused_ops(_tiny(dict(kind="optimal")), backend="reference")
    calls = []
    from noisynn_kernels.ops import mix_add_layernorm as op

    real = op.LAUNCHERS["reference"]  # the stack dispatches through the op's table
    monkeypatch.setitem(op.LAUNCHERS, "reference", lambda *a: calls.append(a[5].cfg.kind) or real(*a))
    fused(torch.randn(2, 3, 32, 32, device=DEVICE))
    assert len(calls) == 2 * 3  # one per add + LayerNorm pair
    assert calls.count("optimal") == 1 and calls.count("identity") == 5  # the noise site, folded into the op


def test_unswap_restores_original_forward():
    m = _tiny(dict(kind="shift"))
    before = {name: (type(mod), set(mod.__dict__)) for name, mod in m.named_modules()}
    swap_fused_ops(m)
    assert type(m).__name__ == "FusedVisionTransformer" and type(m.blocks[0]).__name__ == "FusedViTBlock"
    unswap_fused_ops(m)
    assert not is_swapped(m) and "forward" not in m.blocks.__dict__
    assert {name: (type(mod), set(mod.__dict__)) for name, mod in m.named_modules()} == before
    unswap_fused_ops(m)  # no-op when not swapped


def test_noise_applied_after_swap_is_honoured():
    m = swap_fused_ops(_tiny(False), backend="reference")
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    clean = m.eval()(x)
    nk.apply_noisynn(m, dict(kind="optimal"))
    assert not torch.allclose(m(x), clean)
    nk.remove_noisynn(m)
    torch.testing.assert_close(m(x), clean, rtol=0, atol=0)


def test_plain_timm_vit_and_deit_swap():
    for name, kw in [("vit_tiny_patch16_224", dict(img_size=32, depth=2)),
                     ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2))]:
        m = timm.create_model(name, **kw).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            y = m(x)
            swap_fused_ops(m, backend="reference")
            torch.testing.assert_close(m(x), y, rtol=1e-6, atol=1e-6)


def test_unsupported_models_raise():
    with pytest.raises(UnsupportedModelError):
        swap_fused_ops(timm.create_model("resnet18"))
    with pytest.raises(UnsupportedModelError, match="Block"):
        swap_fused_ops(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1,
                                         block_fn=timm.models.vision_transformer.ResPostBlock))


def test_unavailable_backend_raises_not_falls_back(monkeypatch):
    m = swap_fused_ops(_tiny(False), backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        m(torch.randn(1, 3, 32, 32, device=DEVICE))
    monkeypatch.setenv("NOISYNN_BACKEND", "cpu")
    with pytest.raises(BackendUnavailableError, match="runs CPU tensors only"):
        select_backend("cuda")


def test_backend_selection_rules(monkeypatch):
    monkeypatch.delenv("NOISYNN_BACKEND", raising=False)
    # The compiled C++ kernels when built, else the reference; the interpreter is never chosen automatically.
    assert select_backend("cpu") == ("cpu" if backend_status("cpu", "cpu") is None else "reference")
    assert select_backend("cpu", "reference") == "reference"
    monkeypatch.setenv("NOISYNN_BACKEND", "reference")
    assert select_backend("cuda") == "reference"
    with pytest.raises(BackendUnavailableError, match="not a backend"):
        select_backend("cpu", "fastest")


def _compile_swapped(backend_fn, fused_backend="triton"):
    model = swap_fused_ops(_tiny(dict(kind="shift", axis="rows")).eval(), backend=fused_backend)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend_fn, fullgraph=True)(x)
    return eager, compiled


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend on this device")
def test_fullgraph_compile_of_swapped_model_keeps_the_fused_op():
    """Dynamo traces the whole swapped model without a graph break and the fused op is in the graph
    (not bypassed): one call per add + LayerNorm pair.  The recording backend runs the graph eagerly, so
    this runs on CPU; Inductor's lowering of the op needs a GPU (next test)."""
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    eager, compiled = _compile_swapped(recording_backend)
    assert targets.count(torch.ops.noisynn.mix_add_layernorm_fwd.default) == 2 * 3
    torch.testing.assert_close(compiled, eager)


@pytest.mark.skipif(backend_status("cpu", "cpu") is not None, reason="the C++ CPU kernels are not built")
def test_inductor_compile_on_cpu_runs_the_cpp_op_in_one_graph():
    """torch.compile on CPU works through the C++ op: no graph break (fullgraph), the op is in the
    graph once per add + LayerNorm pair, and Inductor's compiled model matches eager."""
    global DEVICE
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    saved, DEVICE = DEVICE, "cpu"
    try:
        eager, compiled = _compile_swapped(recording_backend, "cpu")
        # The C++ op is called through its overload packet: count either form.
        assert sum(str(t).split(".default")[0] == "noisynn.mix_add_layernorm_fwd_cpp" for t in targets) == 2 * 3
        eager, compiled = _compile_swapped("inductor", "cpu")
    finally:
        DEVICE = saved
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor lowering of a Triton op needs CUDA")
def test_inductor_compile_of_swapped_model_matches_eager():
    eager, compiled = _compile_swapped("inductor")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_attn_output_site_mixes_the_attention_output():
    m = _tiny(dict(kind="shift", axis="rows", alpha=0.4, position="attn_output", layer=1)).eval()
    a = m.blocks[1].attn
    seen = {}
    h = a.proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("proj_in", args[0]))
    with torch.no_grad():
        x = torch.randn(2, 17, 48, device=DEVICE)
        a(x)
        B, N, C = x.shape
        q, k, v = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        expected = nk.linear_transform_noise(o, "shift", axis="rows", alpha=0.4, prefix_tokens=1, grid=(4, 4))
    h.remove()
    torch.testing.assert_close(seen["proj_in"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_attn_output_runs_the_noisy_attention_op(backend, monkeypatch):
    from noisynn_kernels.ops import noisy_attention as op

    calls = []
    for name, real in list(op.LAUNCHERS.items()):  # the model dispatches through the op's table
        monkeypatch.setitem(op.LAUNCHERS, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    m = swap_fused_ops(_tiny(dict(kind="optimal", axis="tokens", position="attn_output")), backend=backend).eval()
    with torch.no_grad():
        m(torch.randn(2, 3, 32, 32, device=DEVICE))
    # One call, at the noise site only; the compiled cpu backend has no attention kernel: the device
    # default (reference on CPU, triton on CUDA).
    assert calls == [("triton" if DEVICE == "cuda" else "reference") if backend == "cpu" else backend]


def test_attn_output_needs_a_vit_attention():
    with pytest.raises(UnsupportedModelError, match="attn_output"):
        nk.apply_noisynn(timm.create_model("resnet18"), nk.NoiseConfig(position="attn_output"))


# --------------------------------------------------------------------------------------------------
# the swap is module state: it survives saving, pickling, copying and moving


def _check_same(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_swapped_model_survives_torch_save_and_load(tmp_path):
    m = swap_fused_ops(_tiny(dict(kind="shift", axis="rows")), backend="reference")
    path = tmp_path / "model.pt"
    torch.save(m, path)
    loaded = torch.load(path, weights_only=False)
    assert is_swapped(loaded) and type(loaded.blocks).__name__ == "FusedBlocks"
    assert all(b._noisynn_fused_backend == "reference" for b in loaded.blocks)
    _check_same(m, loaded, torch.randn(2, 3, 32, 32, device=DEVICE))
    unswap_fused_ops(loaded)
    assert not is_swapped(loaded) and type(loaded.blocks) is torch.nn.Sequential


def test_swapped_model_survives_pickle_deepcopy_and_to():
    import pickle

    m = swap_fused_ops(_tiny(dict(kind="optimal", axis="tokens")))
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    for other in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert is_swapped(other)
        _check_same(m, other, x)
    moved = copy.deepcopy(m).to(dtype=torch.bfloat16)
    assert is_swapped(moved) and next(moved.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        y = moved.eval()(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_swapped_state_dict_loads_into_plain_timm_and_back():
    m = swap_fused_ops(_tiny(dict(kind="optimal", axis="tokens")))
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=48,
                              num_heads=3, num_classes=5).to(DEVICE)
    plain.load_state_dict(m.state_dict(), strict=True)
    fresh = swap_fused_ops(_tiny(False))
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert is_swapped(fresh) and list(fresh.state_dict()) == list(plain.state_dict())
    nk.remove_noisynn(m)
    _check_same(m, fresh, torch.randn(2, 3, 32, 32, device=DEVICE))


def test_swapping_twice_updates_the_backend_and_a_slice_still_runs():
    m = swap_fused_ops(_tiny(False), backend="reference")
    swap_fused_ops(m, backend=None)
    assert is_swapped(m) and all(b._noisynn_fused_backend is None for b in m.blocks)
    tokens = torch.randn(2, 17, 48, device=DEVICE)
    head = m.blocks[:2]  # nn.Sequential slicing keeps the class
    assert type(head).__name__ == "FusedBlocks"
    with torch.no_grad():
        unswapped = torch.nn.Sequential(*m.blocks[:2])
        torch.testing.assert_close(head(tokens), unswapped(tokens), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# gradient checkpointing: set before or after the swap, per block, the same noise and gradients


def _count_fused_calls(monkeypatch):
    from noisynn_kernels.ops import mix_add_layernorm as op

    calls = []
    real = op.LAUNCHERS["reference"]
    monkeypatch.setitem(op.LAUNCHERS, "reference", lambda *a: calls.append(1) or real(*a))
    return calls


def _step(model, x, g):
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * g).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


CKPT_NOISES = [dict(kind="optimal", axis="tokens"), dict(kind="gaussian", layer=1),
               dict(kind="gaussian", seed=3, layer=1), dict(kind="salt_and_pepper", seed=5, p=0.2),
               dict(kind="shift", axis="rows", position="attn_input", layer=1)]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("noise", CKPT_NOISES, ids=lambda n: "-".join(map(str, n.values())))
def test_grad_checkpointing_with_the_swap(noise, when, monkeypatch):
    """``set_grad_checkpointing(True)`` before or after the swap: every fused block checkpoints its step
    (the fused op runs again in backward), the noise is the same as without checkpointing (random noise
    from the global RNG or from the noise's own seeded generator, replayed on recomputation, and the
    generator is left where one forward leaves it), and the gradients equal those of the unswapped
    model with timm's checkpointing (the model without it, for seeded noise: timm's checkpointing
    recomputes the hook's draw from an advanced generator)."""
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    g = torch.randn(4, 5, device=DEVICE)
    plain = _tiny(noise).train()
    if "seed" not in noise:
        plain.set_grad_checkpointing(True)
    fused = copy.deepcopy(plain)
    fused.set_grad_checkpointing(False)
    if when == "before":
        fused.set_grad_checkpointing(True)
    swap_fused_ops(fused, backend="reference")
    if when == "after":
        fused.set_grad_checkpointing(True)
    assert nk.models.fused.grad_checkpointing_enabled(fused) and fused.grad_checkpointing is False
    calls = _count_fused_calls(monkeypatch)
    for step in range(2):  # the second step checks where the generators (and the global RNG) were left
        torch.manual_seed(10 + step)
        ya, ga = _step(plain, x, g)
        torch.manual_seed(10 + step)
        yb, gb = _step(fused, x, g)
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], rtol=0, atol=0, msg=f"step {step}: grad of {n}")
    assert len(calls) == 2 * 2 * 2 * 3  # 2 steps, forward + recomputation, 2 per block, 3 blocks
    unswap_fused_ops(fused)
    assert fused.grad_checkpointing is True  # timm's flag back as the fused blocks had it


def _peak_step_bytes(model, x):
    """Peak of the CPU allocator's live bytes over one training step (forward + backward), relative to
    its start, from the profiler's memory records: what each op allocated net of what it freed (its
    self memory) and what was freed between ops (``[memory]`` records), in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x).square().sum().backward()
    records = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in prof.events())
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_grad_checkpointing_lowers_peak_memory_of_a_training_step():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=2, num_classes=5,
              noise=dict(kind="optimal", axis="tokens", layer=2))
    model = swap_fused_ops(timm.create_model("noisy_vit_tiny_patch16_224", **kw).train(), backend="reference")
    x = torch.randn(8, 3, 32, 32)
    peaks = {}
    for ckpt in (False, True, False):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        peaks[ckpt] = _peak_step_bytes(model, x)
    # 4 blocks on (8, 65, 64) tokens: without checkpointing every block keeps its activations (attention
    # probabilities, MLP hidden, LayerNorm statistics) for backward; with it, only its input pair, and
    # one block's activations at a time while it is recomputed
    one_tensor = 8 * 65 * 64 * 4
    assert peaks[False] > 40 * one_tensor, peaks  # the measurement sees the activations
    assert peaks[True] < 0.6 * peaks[False], peaks


def test_compiled_checkpointed_swapped_model_matches_eager():
    """torch.compile(fullgraph=True) of a swapped model with checkpointing: one graph (the fused blocks'
    checkpoints are traced), the same outputs and gradients as eager without checkpointing, with unseeded
    random noise (torch.utils.checkpoint replays the global RNG)."""
    for noise in (dict(kind="gaussian", layer=1),):
        model = swap_fused_ops(_tiny(noise).train(), backend="reference")
        eager = copy.deepcopy(model)
        model.set_grad_checkpointing(True)
        x, g = torch.randn(2, 3, 32, 32, device=DEVICE), torch.randn(2, 5, device=DEVICE)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.manual_seed(1)
        ya = compiled(x)
        (ya * g).sum().backward()
        ga = {n: p.grad for n, p in model.named_parameters()}
        torch.manual_seed(1)
        yb, gb = _step(eager, x, g)
        torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
        for n in gb:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=f"{noise}: grad of {n}")


def test_compiled_checkpointed_seeded_noise_breaks_the_graph_and_replays_the_noise():
    """Seeded noise draws from the noise module's own generator, which a compiled checkpoint cannot replay:
    the graph breaks at such a block (it runs eagerly, checkpointed, with the generator replayed), and the
    result is that of the eager model without checkpointing."""
    model = swap_fused_ops(_tiny(dict(kind="gaussian", seed=3, layer=1)).train(), backend="reference")
    eager = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    x, g = torch.randn(2, 3, 32, 32, device=DEVICE), torch.randn(2, 5, device=DEVICE)
    torch._dynamo.reset()
    ya = torch.compile(model, backend="aot_eager")(x)
    (ya * g).sum().backward()
    yb, gb = _step(eager, x, g)
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, gb[n], rtol=1e-5, atol=1e-6, msg=f"grad of {n}")
