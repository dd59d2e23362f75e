"""Convergence: a tiny NoisyViT trained from one seed with and without swap_fused_ops follows the
same loss curve and ends at the same parameters.

Tolerance, stated and judged against PyTorch's own error (never a loosened constant).  The oracle is
the eager model trained in float64.  PyTorch's own float32 error is taken from an ensemble: the eager
float32 run plus three runs whose initial weights differ from it by one rounding step (a relative
2**-24 nudge, the size of the difference any reordering of a float32 reduction makes).  Training
amplifies such differences chaotically, so one run's error at one step can be near zero by luck;
the ensemble's largest relative error up to step t, ``drift_t``, is PyTorch's error level there.  At
every one of the 30 steps the fused float32 loss must be within ``(2 * drift_t + 1e-6) * |loss|`` of
the oracle's, and every final parameter within ``2 * max_run max|eager_fp32 - eager_fp64| + 1e-6`` per
tensor.  A wrong kernel (a missing gradient term, a wrong mix) misses these by orders of magnitude
within the first steps.
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


def _nudged(model, seed):
    """A copy whose float32 weights differ from ``model``'s by one rounding step, with random signs."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            sign = torch.randint(0, 2, p.shape, generator=g).to(p.device, p.dtype) * 2 - 1
            p.mul_(1 + sign * 2.0 ** -24)
    return m


BACKENDS = [b for b in ("triton", "cpu") if backend_status(b, DEVICE) is None]


@pytest.mark.skipif(not BACKENDS, reason="no fused backend on this device")
@pytest.mark.parametrize("backend", BACKENDS or ["none"])
@pytest.mark.parametrize("noise", [dict(kind="shift", axis="rows", alpha=0.3),
                                   dict(kind="optimal", axis="tokens", position="attn_input", layer=0)],
                         ids=["shift-rows-block_input", "optimal-tokens-attn_input"])
def test_fused_training_matches_eager_training(noise, backend):
    torch.manual_seed(0)
    # Small enough for the Triton interpreter: 8 images of 2 x 2 patches (+ class token), width 16.
    model = timm.create_model("noisy_vit_tiny_patch16_224", img_size=8, patch_size=4, depth=2, embed_dim=16,
                              num_heads=2, num_classes=2, noise=noise).to(DEVICE)
    model64 = copy.deepcopy(model).double()
    fused = swap_fused_ops(copy.deepcopy(model), backend=backend)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = torch.tensor([0, 1] * 4, device=DEVICE)

    ensemble = [model] + [_nudged(model, seed) for seed in range(3)]
    eager = [_train(m, x, y) for m in ensemble]
    oracle = _train(model64, x.double(), y)
    ours = _train(fused, x, y)
    assert oracle[-1] < 0.1 * oracle[0], "the tiny model should fit its 8 images"
    drift = 0.0
    for step, (o, f) in enumerate(zip(oracle, ours)):
        drift = max([drift] + [abs(run[step] - o) / abs(o) for run in eager])
        bound = (2 * drift + 1e-6) * abs(o)
        assert abs(f - o) <= bound, (f"step {step}: fused loss {f}, eager fp32 {[run[step] for run in eager]}, "
                                     f"fp64 oracle {o}")
    for (name, p64), *params in zip(model64.named_parameters(), *(m.parameters() for m in ensemble),
                                   fused.parameters()):
        *eager_p, q = params
        bound = 2 * max((p.double() - p64).abs().max().item() for p in eager_p) + 1e-6
        err = (q.double() - p64).abs().max().item()
        assert err <= bound, f"final {name}: fused error {err:.3g} > bound {bound:.3g}"
