"""The baselines: NoisyNN noise as public NoisyViT / NoisyResNet code writes it.

Public implementations build the dense ``k x k`` quality matrix and apply it with permutes, a
dense matrix product, an add and a concatenation at the noise site.  These functions reproduce that
path faithfully (same result as :func:`noisynn_kernels.linear_transform_noise`, tested) so the
benchmarks compare against what users run today.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import quality
from ..functional import mixed_size
from ..models.patch import noise_module, replace_noise_module
from ..nn import NoiseInjection

__all__ = ["eager_linear_noise", "eager_add_noise_layernorm", "EagerNoiseInjection", "make_eager"]


def eager_linear_noise(x: torch.Tensor, Q: torch.Tensor, axis: str, prefix_tokens: int = 0,
                       grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``X + Q X`` with a dense ``Q``: split the class token, permute the mixed axis last, dense
    product, add, flatten / transpose back, concatenate."""
    if x.dim() == 3:
        cls_tok, patches = x[:, :prefix_tokens], x[:, prefix_tokens:]
        B, n, D = patches.shape
        if axis == "tokens":
            t = patches.permute(0, 2, 1)                                   # (B, D, n)
            patches = (t + torch.matmul(t, Q.t())).permute(0, 2, 1)
        elif axis == "rows":
            gh, gw = grid
            t = patches.transpose(1, 2).reshape(B, D, gh, gw).permute(0, 1, 3, 2)   # (B, D, gw, gh)
            t = t + torch.matmul(t, Q.t())
            patches = t.permute(0, 1, 3, 2).flatten(2).transpose(1, 2)
        else:
            flat = patches.reshape(B, -1)
            patches = (flat + torch.matmul(Q, flat)).reshape(B, n, D)
        return torch.cat([cls_tok, patches], dim=1)
    B, C, H, W = x.shape
    if axis == "tokens":
        t = x.flatten(2)                                                   # (B, C, H*W)
        return (t + torch.matmul(t, Q.t())).reshape(B, C, H, W)
    if axis == "rows":
        t = x.permute(0, 1, 3, 2)                                          # (B, C, W, H)
        return (t + torch.matmul(t, Q.t())).permute(0, 1, 3, 2)
    flat = x.reshape(B, -1)
    return (flat + torch.matmul(Q, flat)).reshape(B, C, H, W)


def eager_add_noise_layernorm(x, residual, Q, weight, bias, eps, axis, prefix_tokens=0, grid=None):
    """The eager block path at a noise site: add, noise (dense, permutes, concat), LayerNorm.
    Returns ``(normed, residual_out)`` like the fused op."""
    s = x + residual
    r = eager_linear_noise(s, Q, axis, prefix_tokens, grid)
    return F.layer_norm(r, (r.shape[-1],), weight, bias, eps), r


class EagerNoiseInjection(NoiseInjection):
    """:class:`NoiseInjection` computing linear noise the public-code way (dense ``Q``, permutes)."""

    def __init__(self, config, prefix_tokens: int = 0, grid=None):
        super().__init__(config, prefix_tokens, grid)
        self._q: dict[tuple, torch.Tensor] = {}

    def _quality(self, k: int, like: torch.Tensor) -> torch.Tensor:
        key = (k, like.dtype, like.device)
        if key not in self._q:
            c = self.config
            M = quality.mixing_matrix(c.kind, k, c.alpha, self.quality_matrix, shift=c.shift)
            self._q[key] = (M - torch.eye(k, dtype=M.dtype)).to(dtype=like.dtype, device=like.device)
        return self._q[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not (c.is_linear and c.active(self.training)):
            return super().forward(x)
        prefix = self.prefix_tokens if x.dim() == 3 else 0
        grid = self.grid if x.dim() == 3 and c.axis == "rows" else None
        if grid is None and x.dim() == 3 and c.axis == "rows":
            side = int((x.shape[1] - prefix) ** 0.5)
            grid = (side, side)
        Q = self._quality(mixed_size(x, c.axis, prefix, grid), x)
        return eager_linear_noise(x, Q, c.axis, prefix, grid)


def make_eager(model: nn.Module) -> nn.Module:
    """Replace the noise module of a noisy model (from ``apply_noisynn``) with the eager baseline."""
    old = noise_module(model)
    if old is None:
        raise ValueError("make_eager needs a model with noise (apply_noisynn / a noisy_* timm model)")
    replace_noise_module(model, EagerNoiseInjection(old.config, old.prefix_tokens, old.grid).train(old.training))
    return model
