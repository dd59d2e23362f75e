"""noisynn_kernels.mix_add_layernorm: the public, backend-dispatching op (reference backend here;
the Triton backend has its own file)."""

import pytest
import torch

import noisynn_kernels as nk
from noisynn_kernels import reference


@pytest.mark.parametrize("kind", ["identity", "shift", "optimal", "dense"])
@pytest.mark.parametrize("axis", ["tokens", "rows", "batch"])
@pytest.mark.parametrize("after", [False, True])
def test_reference_backend_matches_oracle(kind, axis, after):
    g = torch.Generator().manual_seed(0)
    B, P, gh, gw, D = 3, 1, 2, 3, 7
    x, r = (torch.randn(B, P + gh * gw, D, generator=g, dtype=torch.float64) for _ in range(2))
    w, b = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    k = {"tokens": gh * gw, "rows": gh, "batch": B}[axis]
    q = 0.1 * torch.randn(k, k, generator=g, dtype=torch.float64) if kind == "dense" else None
    cfg = nk.NoiseConfig(kind=kind, axis=axis, matrix=q, eval=False) if axis == "batch" else \
        nk.NoiseConfig(kind=kind, axis=axis, matrix=q, check_matrix=kind != "dense")
    got = nk.mix_add_layernorm(x, r, w, b, 1e-5, mix=cfg, prefix_tokens=P, grid=(gh, gw), mix_after_norm=after,
                               backend="reference")
    M = nk.quality.mixing_matrix("dense", k, matrix=q) if kind == "dense" else None
    exp = reference.mix_add_layernorm(x, r, w, b, 1e-5, kind=kind, axis=axis, alpha=cfg.alpha, M=M, prefix_tokens=P,
                                      grid=(gh, gw) if axis == "rows" else None, mix_after_norm=after)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_bad_arguments_are_checked_for_every_kind():
    x = torch.randn(2, 5, 4)
    with pytest.raises(nk.ShapeError, match="prefix_tokens = 5"):
        nk.mix_add_layernorm(x, prefix_tokens=5, backend="reference")  # identity mix still checks the prefix
    with pytest.raises(nk.ShapeError, match="residual has shape"):
        nk.mix_add_layernorm(x, torch.randn(2, 5, 3), backend="reference")
    with pytest.raises(nk.ShapeError, match="residual has dtype"):
        nk.mix_add_layernorm(x, x.double(), backend="reference")
    with pytest.raises(nk.ConfigError, match="eps"):
        nk.mix_add_layernorm(x, eps=0.0, backend="reference")
    with pytest.raises(nk.ConfigError, match="linear transform noise"):
        nk.mix_add_layernorm(x, mix="gaussian", backend="reference")
    with pytest.raises(nk.ShapeError, match="dense quality matrix has shape"):
        nk.mix_add_layernorm(x, mix=nk.NoiseConfig(kind="dense", matrix=torch.zeros(3, 3)), backend="reference")
    with pytest.raises(nk.BackendUnavailableError, match="not a backend"):
        nk.mix_add_layernorm(x, backend="fast")
