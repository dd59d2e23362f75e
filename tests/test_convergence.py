"""Convergence: a tiny NoisyViT trained from one seed with and without swap_fused_ops follows the
same loss curve and ends at the same parameters.

Tolerance, stated and judged against PyTorch's own error (never a loosened constant): the oracle is
the eager model trained in float64; at every one of the 30 steps the fused float32 run's loss must be
within ``2 * |eager_fp32 - eager_fp64| + 1e-6 * |loss|`` of the oracle's, and so must every final
parameter (``2 * max|eager_fp32 - eager_fp64| + 1e-6`` per tensor).  SGD amplifies rounding along the
way (PyTorch's own fp32 run drifts to ~1e-4 relative mid-training), so a fixed tolerance would be
either too loose early or too tight mid-way; a wrong kernel (a missing gradient term, a wrong mix)
breaks the bound within the first steps.
"""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from noisynn_kernels._ext import backend_status
from noisynn_kernels.models.fused import swap_fused_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 30


def _train(model, x, y, steps=STEPS):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(backend_status("triton", DEVICE) is not None, reason="no Triton backend on this device")
@pytest.mark.parametrize("noise", [dict(kind="shift", axis="rows", alpha=0.3),
                                   dict(kind="optimal", axis="tokens", position="attn_input", layer=0)],
                         ids=["shift-rows-block_input", "optimal-tokens-attn_input"])
def test_fused_training_matches_eager_training(noise):
    torch.manual_seed(0)
    # Small enough for the Triton interpreter: 8 images of 2 x 2 patches (+ class token), width 16.
    model = timm.create_model("noisy_vit_tiny_patch16_224", img_size=8, patch_size=4, depth=2, embed_dim=16,
                              num_heads=2, num_classes=2, noise=noise).to(DEVICE)
    model64 = copy.deepcopy(model).double()
    fused = swap_fused_ops(copy.deepcopy(model), backend="triton")
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = torch.tensor([0, 1] * 4, device=DEVICE)

    eager = _train(model, x, y)
    oracle = _train(model64, x.double(), y)
    ours = _train(fused, x, y)
    assert oracle[-1] < 0.1 * oracle[0], "the tiny model should fit its 8 images"
    for step, (e, o, f) in enumerate(zip(eager, oracle, ours)):
        bound = 2 * abs(e - o) + 1e-6 * abs(o)
        assert abs(f - o) <= bound, f"step {step}: fused loss {f}, eager fp32 {e}, fp64 oracle {o}"
    for (name, p), (_, p64), (_, q) in zip(model.named_parameters(), model64.named_parameters(),
                                           fused.named_parameters()):
        bound = 2 * (p.double() - p64).abs().max().item() + 1e-6
        err = (q.double() - p64).abs().max().item()
        assert err <= bound, f"final {name}: fused error {err:.3g} > bound {bound:.3g}"
