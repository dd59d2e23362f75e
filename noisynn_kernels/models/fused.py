"""Swap fused ``mix_add_layernorm`` into a timm ViT-family model in place, and back.

A pre-norm ViT runs, per block, ``x = x + attn(norm1(x))`` and ``x = x + mlp(norm2(x))``.  After
:func:`swap_fused_ops` the block stack runs every residual add together with the LayerNorm that
follows it as one :func:`~noisynn_kernels.mix_add_layernorm` call (the MLP add of block ``i`` with
``norm1`` of block ``i + 1``), and folds a linear noise site into the same call: ``block_input``
noise mixes the residual stream (``residual_out = M s``), ``attn_input`` noise mixes the
LayerNorm-1 output (``mix_after_norm``), and ``attn_output`` noise runs attention through
:func:`~noisynn_kernels.functional.noisy_attention` with the mix fused into its epilogue.  Attention
without a noise site stays timm's (``F.scaled_dot_product_attention``).  Random noises at a site are
applied unfused, where the hooks would apply them.

Nothing is replaced but the class of ``model.blocks``: the ``nn.Sequential`` becomes a
:class:`FusedBlocks` (a subclass defined here, so the swapped model survives ``torch.save`` /
``torch.load``, ``pickle`` and ``copy.deepcopy``), every parameter, buffer and ``state_dict()`` key
is untouched, and :func:`unswap_fused_ops` restores the original exactly.  The noise is read from
the model at every call, so ``apply_noisynn`` / ``remove_noisynn`` work before or after the swap.
Hooks registered on individual blocks or their ``norm1``/``norm2`` are not called by the fused stack
(the noise hooks are honoured by it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..functional import mix_add_layernorm, noisy_attention
from ..nn import NOT_SCRIPTABLE_MESSAGE
from ..ops import noisy_attention as noisy_attention_op
from .patch import model_family, site_noise

__all__ = ["swap_fused_ops", "unswap_fused_ops", "is_swapped", "FusedBlocks"]

_FUSED_ATTR = "_noisynn_fused_backend"
_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def _check_block(i: int, blk: nn.Module) -> None:
    from timm.models.vision_transformer import Block

    if type(blk).forward is not Block.forward or any(not hasattr(blk, p) for p in _BLOCK_PARTS):
        raise UnsupportedModelError(
            f"swap_fused_ops needs timm pre-norm transformer blocks (timm.models.vision_transformer.Block: "
            f"x + attn(norm1(x)), x + mlp(norm2(x))); block {i} is {type(blk).__name__}")
    for name in ("norm1", "norm2"):
        norm = getattr(blk, name)
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise UnsupportedModelError(f"swap_fused_ops fuses LayerNorm over the last dim; block {i}.{name} is "
                                        f"{type(norm).__name__}")


def _active_site(module: nn.Module):
    site = site_noise(module)
    if site is None or not site.config.active(site.training):
        return None
    return site


def _attention(attn: nn.Module, x, backend):
    """``attn(x)``, with an active linear ``attn_output`` noise fused into the attention kernel
    (:func:`~noisynn_kernels.functional.noisy_attention`).  timm's Attention runs unchanged (the noise
    then applies through its hook) when there is no such site, when its ``.norm`` is not Identity
    (the site is after that norm), or in training with attention dropout (the kernel has none)."""
    norm = getattr(attn, "norm", None)
    site = _active_site(norm) if isinstance(norm, nn.Identity) else None
    if site is None or not site.config.is_linear or (attn.training and attn.attn_drop.p > 0):
        return attn(x)
    site.warn_if_local_batch_mix()
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    # A backend without attention kernels (the compiled cpu / cuda ones): attention takes the device default.
    y = noisy_attention(q, k, v, mix=site.config, scale=attn.scale, prefix_tokens=site.prefix_tokens,
                        grid=site.grid, backend=backend if backend in noisy_attention_op.LAUNCHERS else None)
    y = y.transpose(1, 2).reshape(B, N, getattr(attn, "attn_dim", attn.num_heads * attn.head_dim))
    if gate is not None:
        y = y * gate
    return attn.proj_drop(attn.proj(y))


def _fused_blocks_forward(blocks: nn.Sequential, x):
    backend = getattr(blocks, _FUSED_ATTR, None)  # (a slice blocks[a:b] is a FusedBlocks without it)
    res, pending = x, None  # residual stream, and the branch output not yet added to it
    for blk in blocks:
        for norm_name, branch in (("norm1", "attn"), ("norm2", "mlp")):
            norm = getattr(blk, norm_name)
            mix, after, prefix, grid, post = None, False, 0, None, None
            if norm_name == "norm1":
                site = _active_site(blk)
                if site is not None and site.config.is_linear:
                    site.warn_if_local_batch_mix()
                    mix, prefix, grid = site.config, site.prefix_tokens, site.grid
                elif site is not None:  # random noise on the residual stream entering the block
                    res = site(res if pending is None else res + pending)
                    pending = None
                site = _active_site(norm)
                if site is not None and site.config.is_linear:
                    site.warn_if_local_batch_mix()
                    mix, after, prefix, grid = site.config, True, site.prefix_tokens, site.grid
                elif site is not None:
                    post = site
            if pending is None:
                normed, res = mix_add_layernorm(res, None, norm.weight, norm.bias, norm.eps, mix=mix,
                                                prefix_tokens=prefix, grid=grid, mix_after_norm=after,
                                                backend=backend)
            else:
                if pending.dtype != res.dtype:  # autocast: a low-precision branch output joins the fp32 stream
                    dt = torch.promote_types(pending.dtype, res.dtype)
                    pending, res = pending.to(dt), res.to(dt)
                normed, res = mix_add_layernorm(pending, res, norm.weight, norm.bias, norm.eps, mix=mix,
                                                prefix_tokens=prefix, grid=grid, mix_after_norm=after,
                                                backend=backend)
            if post is not None:
                normed = post(normed)
            if branch == "attn":
                pending = blk.drop_path1(blk.ls1(_attention(blk.attn, normed, backend)))
            else:
                pending = blk.drop_path2(blk.ls2(blk.mlp(normed)))
    return res if pending is None else res + pending


class FusedBlocks(nn.Sequential):
    """The block stack of a swapped timm ViT: an ``nn.Sequential`` of timm ``Block`` modules whose
    ``forward`` runs the fused stack (:func:`swap_fused_ops`).  The chosen backend is the instance
    attribute ``_noisynn_fused_backend`` (``None``: per device at each call)."""

    def forward(self, x):
        return _fused_blocks_forward(self, x)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this before compiling a module: a clear error here instead of a
        # TorchScript frontend error deep inside the fused forward.
        raise UnsupportedModelError("swap_fused_ops: " + NOT_SCRIPTABLE_MESSAGE)


def swap_fused_ops(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Run every residual add + LayerNorm pair of a timm ViT-family model through the fused
    ``mix_add_layernorm`` (noise site or not), in place; returns the model.

    ``backend`` (``reference``, ``triton``, ...; ``None``: chosen per device at each call, see
    :func:`noisynn_kernels.backend_info`) is checked when the op runs, and an unavailable backend
    raises :class:`~noisynn_kernels.BackendUnavailableError`.  Raises
    :class:`~noisynn_kernels.UnsupportedModelError` for models whose blocks are not timm's pre-norm
    ``Block`` with LayerNorm.  Parameters and ``state_dict()`` keys are unchanged.
    """
    if model_family(model) != "vit":
        raise UnsupportedModelError(f"swap_fused_ops works on timm ViT-family models (.patch_embed and .blocks); "
                                    f"got {type(model).__name__}")
    if type(model.blocks) not in (nn.Sequential, FusedBlocks):
        raise UnsupportedModelError(f"swap_fused_ops needs model.blocks to be nn.Sequential, got "
                                    f"{type(model.blocks).__name__}")
    if getattr(model, "grad_checkpointing", False):
        raise UnsupportedModelError("swap_fused_ops does not support timm gradient checkpointing "
                                    "(model.set_grad_checkpointing(True)); disable it first")
    for i, blk in enumerate(model.blocks):
        _check_block(i, blk)
    model.blocks.__class__ = FusedBlocks
    setattr(model.blocks, _FUSED_ATTR, backend)
    return model


def unswap_fused_ops(model: nn.Module) -> nn.Module:
    """Undo :func:`swap_fused_ops`; a model that was not swapped is returned unchanged."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, FusedBlocks):
        blocks.__class__ = nn.Sequential
        blocks.__dict__.pop(_FUSED_ATTR, None)
    return model


def is_swapped(model: nn.Module) -> bool:
    """Whether :func:`swap_fused_ops` is in effect on ``model``."""
    return isinstance(getattr(model, "blocks", None), FusedBlocks)
