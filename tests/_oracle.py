"""The fp64 oracle and the tolerance rule of the fused ops' tests (tests/test_mix_add_layernorm.py,
tests/test_noisy_attention.py): inputs, the reference call, the tolerance rule and ``run_case``.

Tolerance (flash-attention's rule, not loosened), written here once: with ``ref64`` the reference on
float64 copies of the inputs and ``ref_same`` the reference run in the kernel's dtype,
``max|ours - ref64| <= 2 * max|ref_same - ref64| + atol``, atol = :data:`ATOL` (1e-5 fp32, 1e-3 fp16,
1e-2 bf16).  The same rule is applied to every gradient, taken by autograd with random upstream
gradients (for mix_add_layernorm: dx, dresidual, dweight, dbias through both outputs).

A test makes one :class:`Oracle` for the ``mix_add_layernorm`` backend under test and its device and
uses its methods.  The kinds and axes are the package's (:data:`KINDS`, :data:`AXES`).
"""

import math

import torch

import noisynn_kernels as nk
from noisynn_kernels import NoiseConfig, quality, reference
from noisynn_kernels._checks import AXES
from noisynn_kernels.quality import LINEAR_KINDS as KINDS

__all__ = ["ATOL", "KINDS", "AXES", "ALPHA", "gen", "dense_q", "mixed_k", "make_config", "check", "Oracle"]

#: The absolute term of the tolerance rule, per dtype.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
#: The shift strength the tests use.
ALPHA = 0.3


def gen(seed):
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def dense_q(k, seed=0):
    """A dense Q whose M = I + Q is strictly diagonally dominant (invertible, row-dominant)."""
    return (torch.rand(k, k, generator=gen(1000 + k + seed), dtype=torch.float64) * 2 - 1) * (0.4 / k)


def mixed_k(B, N, axis, prefix, grid):
    """``k``, the rows mixed together along ``axis`` for ``B`` samples of ``N`` tokens (``prefix`` of
    them not mixed; ``grid`` the ``(gh, gw)`` patch grid of the ``rows`` axis)."""
    if axis == "rows":
        return grid[0]
    return N - prefix if axis == "tokens" else B


def make_config(kind, axis, k, *, alpha=ALPHA, seed=0, **kw):
    """A linear config of ``kind`` on ``axis`` for ``k`` mixed rows (``dense``: :func:`dense_q`)."""
    Q = dense_q(k, seed) if kind == "dense" else None
    return NoiseConfig(kind=kind, axis=axis, alpha=alpha, matrix=Q, allow_batch_dependence=True, **kw)


def _noncontig(t, layout):
    if layout == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(t.shape[:-1] + (t.shape[-1] + 5,), dtype=t.dtype, device=t.device)
    wide[..., 2:2 + t.shape[-1]] = t
    return wide[..., 2:2 + t.shape[-1]]


def check(out, ref64, ref_same, atol, what):
    """The tolerance rule: max|out - ref64| <= 2 * max|ref_same - ref64| + atol."""
    assert out.shape == ref64.shape, what
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_same.double() - ref64).abs().max().item()
    assert math.isfinite(err), f"{what}: non-finite output"
    assert err <= 2 * ref_err + atol, f"{what}: max|out - ref64| = {err:.3g} > 2 * {ref_err:.3g} + {atol:g}"


class Oracle:
    """The helpers bound to one ``mix_add_layernorm`` backend: its name (``reference``, ``cpu``, ``cuda`` or
    ``triton``), the device its tensors live on, and the device the references run on (default: the same)."""

    def __init__(self, backend, device, reference_device=None):
        self.backend, self.device = backend, device
        self.reference_device = device if reference_device is None else reference_device

    def fused(self, x, residual=None, weight=None, bias=None, eps=1e-6, *, mix=None, prefix_tokens=0, grid=None,
              mix_after_norm=False):
        """The backend under test behind the package's own argument checks: ``(normed, residual_out)``."""
        return nk.mix_add_layernorm(x, residual, weight, bias, eps, mix=mix, prefix_tokens=prefix_tokens, grid=grid,
                                    mix_after_norm=mix_after_norm, backend=self.backend)

    def make_inputs(self, B, N, D, *, has_res, has_w, has_b, seed=0):
        """``(vals, leaves)``: fp32 values on the CPU and ``leaves(dtype, device=None, contiguous=True)``, the
        leaf tensors (x, residual, weight, bias; requiring grad) in ``dtype`` on ``device`` (default: the
        backend's)."""
        g = gen(seed)
        vals = {"x": torch.randn(B, N, D, generator=g) * 2 + 0.5,
                "residual": torch.randn(B, N, D, generator=g) if has_res else None,
                "weight": 1 + 0.5 * torch.randn(D, generator=g) if has_w else None,
                "bias": 0.3 * torch.randn(D, generator=g) if has_b else None,
                "g_normed": torch.randn(B, N, D, generator=g),
                "g_residual": torch.randn(B, N, D, generator=g)}

        def leaves(dt, device=None, contiguous=True):
            device = self.device if device is None else device
            out = {}
            for name in ("x", "residual", "weight", "bias"):
                v = vals[name]
                if v is None:
                    out[name] = None
                    continue
                t = v.to(device=device, dtype=dt)
                if not contiguous and name in ("x", "residual"):
                    t = _noncontig(t, "transposed" if name == "x" else "sliced")
                    assert not t.is_contiguous()
                out[name] = t.requires_grad_()
            return out

        return vals, leaves

    @staticmethod
    def reference_call(t, *, cfg, prefix, grid, mix_after_norm, eps=1e-6):
        """:func:`noisynn_kernels.reference.mix_add_layernorm` on the leaves ``t`` with the mix of ``cfg``."""
        k = mixed_k(t["x"].shape[0], t["x"].shape[1], cfg.axis, prefix, grid)
        M = quality.mixing_matrix("dense", k, matrix=cfg.matrix).to(t["x"].device) if cfg.kind == "dense" else None
        return reference.mix_add_layernorm(t["x"], t["residual"], t["weight"], t["bias"], eps, kind=cfg.kind,
                                           axis=cfg.axis, alpha=cfg.alpha, M=M, prefix_tokens=prefix, grid=grid,
                                           mix_after_norm=mix_after_norm, straight_through=cfg.straight_through,
                                           shift=cfg.shift)

    @staticmethod
    def grads(t, outs, vals, use=("normed", "residual_out")):
        """Gradients of the leaves ``t`` through the outputs in ``use``, with the fixed upstream gradients."""
        dt, dev = outs[0].dtype, outs[0].device
        loss = 0
        if "normed" in use:
            loss = loss + (outs[0] * vals["g_normed"].to(device=dev, dtype=dt)).sum()
        if "residual_out" in use:
            loss = loss + (outs[1] * vals["g_residual"].to(device=dev, dtype=dt)).sum()
        names = [n for n in ("x", "residual", "weight", "bias") if t[n] is not None]
        grads = torch.autograd.grad(loss, [t[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(t[n]) if g is None else g for n, g in zip(names, grads)}

    def run_case(self, B, N, D, prefix, kind, axis, mix_after_norm, dtype, *, has_res=True, has_w=True,
                 has_b=True, grid=None, noncontig=False, alpha=ALPHA, straight_through=False,
                 use=("normed", "residual_out"), seed=0, backward=True, shift=1):
        """One case: outputs and (``backward``) every gradient against the fp64 reference, by the tolerance
        rule above."""
        n = N - prefix
        if axis == "rows" and grid is None:
            grid = (math.isqrt(n), math.isqrt(n))
        k = mixed_k(B, N, axis, prefix, grid)
        cfg = make_config(kind, axis, k, alpha=alpha, seed=seed, straight_through=straight_through, shift=shift)
        vals, leaves = self.make_inputs(B, N, D, has_res=has_res, has_w=has_w, has_b=has_b, seed=seed)
        atol = ATOL[dtype]
        t = leaves(dtype, contiguous=not noncontig)
        outs = self.fused(t["x"], t["residual"], t["weight"], t["bias"], 1e-6, mix=cfg, prefix_tokens=prefix,
                          grid=grid if axis == "rows" else None, mix_after_norm=mix_after_norm)
        assert outs[0].dtype == dtype and outs[1].dtype == dtype
        assert outs[0].device.type == outs[1].device.type == torch.device(self.device).type
        t64, ts = leaves(torch.float64, self.reference_device), leaves(dtype, self.reference_device)
        ref64 = self.reference_call(t64, cfg=cfg, prefix=prefix, grid=grid, mix_after_norm=mix_after_norm)
        refs = self.reference_call(ts, cfg=cfg, prefix=prefix, grid=grid, mix_after_norm=mix_after_norm)
        for name, o, r64, rs in zip(("normed", "residual_out"), outs, ref64, refs):
            check(o.to(r64.device), r64, rs, atol, name)
        if not backward:
            return
        g = self.grads(t, outs, vals, use)
        g64, gs = self.grads(t64, ref64, vals, use), self.grads(ts, refs, vals, use)
        assert set(g) == set(g64)
        for name in g:
            assert g[name].dtype == t[name].dtype and g[name].shape == t[name].shape
            check(g[name].to(g64[name].device), g64[name], gs[name], atol, f"d{name}")
