"""Pure-PyTorch reference of every NoisyNN op: the definition the kernels are tested against.

Nothing here checks its arguments (the public functions in :mod:`noisynn_kernels.functional` do
that once) and nothing here calls a kernel.  Shapes:

- token tensors ``(B, N, D)``: the first ``prefix_tokens`` tokens (class / register tokens) pass
  through every noise unchanged; the other ``N - prefix_tokens`` are the patch tokens.
- feature maps and images ``(B, C, H, W)``: no prefix tokens.

Linear transform noise mixes ``k`` rows of a ``(outer, k, inner)`` view of the patch part:

==========  =====================================  =====================================
axis        (B, N, D) tokens                        (B, C, H, W) feature map
==========  =====================================  =====================================
``batch``   ``(1, B, (N-P)*D)``                     ``(1, B, C*H*W)``
``tokens``  ``(B, N-P, D)``                         ``(B*C, H*W, 1)``
``rows``    ``(B, gh, gw*D)`` with grid ``(gh, gw)`` ``(B*C, H, W)``
==========  =====================================  =====================================

``shift`` and ``optimal`` are computed in O(k d) (a roll, a column sum), never as a dense product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "mix_rows",
    "noisy_attention",
    "linear_transform_noise",
    "gaussian_noise",
    "salt_and_pepper_noise",
    "salt_and_pepper_range",
    "layer_norm",
    "mix_add_layernorm",
]


def mix_rows(v: torch.Tensor, kind: str, alpha: float = 0.3, M: torch.Tensor | None = None,
             shift: int = 1) -> torch.Tensor:
    """Apply ``M = I + Q`` along dim 1 of a ``(outer, k, inner)`` tensor.

    ``M`` is the full mixing matrix, needed only for ``kind='dense'``; ``shift`` is the direction of
    the ``shift`` kind (``+1``: row ``i`` receives row ``i - 1``; ``-1``: row ``i + 1``).
    """
    if kind == "identity":
        return v
    k = v.shape[1]
    if kind == "shift":
        # y_i = (1 - a) x_i + a x_{(i-s) mod k}; roll(s)[i] = x[i-s].
        return (1.0 - alpha) * v + alpha * torch.roll(v, shifts=shift, dims=1)
    if kind == "optimal":
        # y_i = (x_i + sum_j x_j) / (k + 1)
        return (v + v.sum(dim=1, keepdim=True)) / (k + 1)
    if kind == "dense":
        return torch.matmul(M.to(dtype=v.dtype, device=v.device), v)
    raise ValueError(f"unknown linear kind {kind!r}")


def _split_prefix(x: torch.Tensor, prefix_tokens: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    if x.dim() == 3 and prefix_tokens:
        return x[:, :prefix_tokens], x[:, prefix_tokens:]
    return None, x


def _join_prefix(head: torch.Tensor | None, body: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = body if head is None else torch.cat([head, body], dim=1)
    if (like.dim() == 4 and not like.is_contiguous()
            and like.is_contiguous(memory_format=torch.channels_last)):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def mixed_view_shape(shape, axis: str, prefix_tokens: int = 0, grid: tuple[int, int] | None = None):
    """The ``(outer, k, inner)`` shape that the patch part of a tensor of ``shape`` is mixed in."""
    if len(shape) == 3:
        B, N, D = shape
        n = N - prefix_tokens
        if axis == "batch":
            return (1, B, n * D)
        if axis == "tokens":
            return (B, n, D)
        gh, gw = grid
        return (B, gh, gw * D)
    B, C, H, W = shape
    if axis == "batch":
        return (1, B, C * H * W)
    if axis == "tokens":
        return (B * C, H * W, 1)
    return (B * C, H, W)


def linear_transform_noise(x: torch.Tensor, kind: str = "optimal", *, axis: str = "tokens", alpha: float = 0.3,
                           M: torch.Tensor | None = None, prefix_tokens: int = 0,
                           grid: tuple[int, int] | None = None, straight_through: bool = False,
                           shift: int = 1) -> torch.Tensor:
    """``(I + Q) X`` along ``axis``; prefix tokens unchanged.  ``M`` is the full ``k x k`` mixing matrix
    (``dense`` only), ``shift`` the direction of the ``shift`` kind (see :func:`mix_rows`).  With
    ``straight_through`` the forward value is ``M x`` and the gradient the identity."""
    head, body = _split_prefix(x, prefix_tokens)
    v = body.reshape(mixed_view_shape(x.shape, axis, prefix_tokens, grid))
    mixed = mix_rows(v, kind, alpha, M, shift).reshape(body.shape)
    if straight_through:
        mixed = body + (mixed - body).detach()
    return _join_prefix(head, mixed, x)


def _draw(shape, draw, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Half types are drawn in fp32 so a seed gives the same noise whatever the activation dtype.
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if generator is None:  # (the generator overload takes no symbolic sizes under torch.compile)
        return draw(shape, device=x.device, dtype=dtype)
    return draw(shape, generator=generator, device=x.device, dtype=dtype)


def gaussian_noise(x: torch.Tensor, *, std: float = 1.0, mean: float = 0.0, strength: float = 0.1,
                   prefix_tokens: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + strength * N(mean, std)`` elementwise on the patch part (official defaults)."""
    head, body = _split_prefix(x, prefix_tokens)
    z = _draw(body.shape, torch.randn, x, generator)
    noisy = body + (strength * (mean + std * z)).to(x.dtype)
    return _join_prefix(head, noisy, x)


def salt_and_pepper_range(body: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The detached ``(low, high)`` salt-and-pepper takes where it is given no values: each sample's own
    minimum / maximum (``rule='sample'``; shape ``(B, 1, ...)``) or the whole batch's (``'batch'``,
    the official latent-level rule; 0-d), over the elements the noise may replace (``body``: the
    patch part, prefix tokens excluded)."""
    b = body.detach()
    if rule == "sample":
        dims = tuple(range(1, b.dim()))
        return b.amin(dim=dims, keepdim=True), b.amax(dim=dims, keepdim=True)
    return b.amin(), b.amax()


def salt_and_pepper_noise(x: torch.Tensor, p: float, *, low=None, high=None, value_range: str = "sample",
                          prefix_tokens: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each patch element draws ``u ~ U(0, 1)``: ``u < p/2`` becomes ``high`` (salt), ``u > 1 - p/2``
    becomes ``low`` (pepper).  ``low``/``high`` not given are taken by the ``value_range`` rule (see
    :func:`salt_and_pepper_range`): by default each sample's own range, so no sample depends on the
    others."""
    head, body = _split_prefix(x, prefix_tokens)
    lo_r, hi_r = salt_and_pepper_range(body, value_range) if low is None or high is None else (None, None)
    hi = hi_r if high is None else torch.as_tensor(high, dtype=x.dtype, device=x.device)
    lo = lo_r if low is None else torch.as_tensor(low, dtype=x.dtype, device=x.device)
    u = _draw(body.shape, torch.rand, x, generator)
    noisy = torch.where(u < p / 2, hi, torch.where(u > 1 - p / 2, lo, body))
    return _join_prefix(head, noisy, x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, written out (the oracle for fused kernels)."""
    mu = x.mean(dim=-1, keepdim=True)
    var = (x - mu).pow(2).mean(dim=-1, keepdim=True)
    y = (x - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _layer_norm_keep_dtype(t: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dim, computed in the promoted dtype of ``t``, ``weight`` and ``bias``
    and returned in ``t``'s dtype (``F.layer_norm`` itself rejects e.g. fp32 ``t`` with a bf16 weight)."""
    dt = t.dtype
    for p in (weight, bias):
        if p is not None:
            dt = torch.promote_types(dt, p.dtype)
    D = t.shape[-1]
    if dt == t.dtype and all(p is None or p.dtype == dt for p in (weight, bias)):
        return F.layer_norm(t, (D,), weight, bias, eps)
    return F.layer_norm(t.to(dt), (D,), None if weight is None else weight.to(dt),
                        None if bias is None else bias.to(dt), eps).to(t.dtype)


def mix_add_layernorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float = 1e-6, *, kind: str = "identity", axis: str = "tokens",
                      alpha: float = 0.3, M: torch.Tensor | None = None, prefix_tokens: int = 0,
                      grid: tuple[int, int] | None = None, mix_after_norm: bool = False,
                      straight_through: bool = False, shift: int = 1):
    """Residual add, ``(I + Q)`` mix and LayerNorm: returns ``(normed, residual_out)``.

    The definition of :func:`noisynn_kernels.mix_add_layernorm`, every option included:
    ``s = x + residual`` (or ``x``); by default ``residual_out = M s`` and ``normed = LN(residual_out)``;
    with ``mix_after_norm`` ``residual_out = s`` and ``normed = M LN(s)`` (the official ViT position).
    The mix is :func:`linear_transform_noise` of the ``(B, N, D)`` tensor (prefix tokens never mixed;
    ``straight_through``: forward ``M t``, gradient the identity).  LayerNorm is ``F.layer_norm`` in the
    promoted dtype of its input and affine parameters; both outputs have ``x``'s dtype.
    """
    s = x if residual is None else x + residual

    def mix(t):
        if kind == "identity":
            return t
        return linear_transform_noise(t, kind, axis=axis, alpha=alpha, M=M, prefix_tokens=prefix_tokens, grid=grid,
                                      straight_through=straight_through, shift=shift)

    if mix_after_norm:
        return mix(_layer_norm_keep_dtype(s, weight, bias, eps)), s
    r = mix(s)
    return _layer_norm_keep_dtype(r, weight, bias, eps), r


def noisy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    kind: str = "identity", axis: str = "tokens", alpha: float = 0.3, M: torch.Tensor | None = None,
                    prefix_tokens: int = 0, grid: tuple[int, int] | None = None,
                    straight_through: bool = False, shift: int = 1) -> torch.Tensor:
    """``M softmax(q k^T * scale) v`` for ``(B, H, N, Dh)`` inputs, written out (the scores are
    materialised: this is the definition, not a fast path).  ``scale`` defaults to ``Dh ** -0.5``.

    ``M = I + Q`` mixes the query tokens of the output along ``axis`` exactly as
    :func:`linear_transform_noise` mixes the ``(B, N, H * Dh)`` tokens that the output projection
    reads: ``tokens``/``rows`` mix the patch tokens of one sample (the same ``M`` for every head and
    channel), ``batch`` mixes the samples at each head and token; prefix tokens are never mixed.
    """
    B, H, N, Dh = q.shape
    if scale is None:
        scale = Dh ** -0.5
    attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)
    o = torch.matmul(attn, v)
    if kind == "identity":
        return o
    t = o.transpose(1, 2).reshape(B, N, H * Dh)
    t = linear_transform_noise(t, kind, axis=axis, alpha=alpha, M=M, prefix_tokens=prefix_tokens, grid=grid,
                               straight_through=straight_through, shift=shift)
    return t.reshape(B, N, H, Dh).transpose(1, 2)
