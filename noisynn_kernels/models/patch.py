"""Turn an existing timm model into a NoisyNN model in place, and back.

The noise is a :class:`~noisynn_kernels.nn.NoiseInjection` child module plus one forward hook at the
noise site, so parameters, buffers and ``state_dict()`` keys stay exactly those of the timm model:
timm checkpoints load with ``strict=True``, and :func:`remove_noisynn` restores the original model.

Supported families:

- **ViT family** (timm models with ``.patch_embed`` and ``.blocks`` of pre-norm blocks: ViT with a class
  token or register tokens or neither (global average pool), DeiT / DeiT-3, EVA / EVA-02, BEiT, CaiT):
  tokens ``(B, N, D)``, prefix tokens ``model.num_prefix_tokens``, patch grid
  ``model.patch_embed.grid_size``.  CaiT's ``.blocks`` are its patch blocks (no class token yet: no
  prefix); its class-attention blocks carry no noise.
- **Swin** (timm ``SwinTransformer``): the blocks of every stage in order, on ``(B, H, W, C)`` tokens;
  the noise sees a stage's ``(B, C, H, W)`` view, so ``tokens`` mixes its H*W positions and ``rows`` its
  H rows, as for a feature map.
- **ResNet family** (``.layer1`` .. ``.layer4``): feature maps ``(B, C, H, W)``; the blocks are those of
  the four stages in order.
- **ConvNeXt** (timm ``ConvNeXt``, ``.stages`` whose items have ``.blocks``): feature maps ``(B, C, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import NoiseConfig
from ..errors import ConfigError, UnsupportedModelError
from ..nn import NoiseInjection

__all__ = ["apply_noisynn", "remove_noisynn", "noise_config", "model_family", "model_blocks", "noise_module",
           "site_noise", "replace_noise_module", "run_site_noise", "SUPPORTED_FAMILIES"]

#: What :func:`apply_noisynn` accepts, for error messages.
SUPPORTED_FAMILIES = ("timm ViT-family models (.patch_embed and .blocks: ViT with class / register tokens or global "
                      "average pool, DeiT, DeiT-3, EVA, EVA-02, BEiT, CaiT), Swin (SwinTransformer), ResNet-family "
                      "models (.layer1 .. .layer4) and ConvNeXt")

_SITE_ATTR = "noisynn"          # name of the NoiseInjection child at the noise site
_STATE_ATTR = "_noisynn_state"  # bookkeeping on the model root


@dataclass
class _NoisynnState:
    config: NoiseConfig
    site: nn.Module
    handles: list[Any] = field(default_factory=list)


def _is_swin(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def model_family(model: nn.Module) -> str:
    """``'vit'``, ``'swin'``, ``'resnet'`` or ``'convnext'``; raises :class:`UnsupportedModelError` otherwise."""
    if hasattr(model, "patch_embed") and isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        return "vit"
    if _is_swin(model):
        return "swin"
    if all(isinstance(getattr(model, f"layer{i}", None), nn.Sequential) for i in range(1, 5)):
        return "resnet"
    from timm.models.convnext import ConvNeXt

    # ConvNeXt itself, not any model with .stages of .blocks: some of those (SwinTransformerV2Cr) run their
    # blocks on (B, H, W, C), which the feature-map noise would read as (B, C, H, W)
    if isinstance(model, ConvNeXt):
        return "convnext"
    raise UnsupportedModelError(f"{type(model).__name__} is not a supported model: expected {SUPPORTED_FAMILIES}")


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's residual blocks in forward order (what ``NoiseConfig.layer`` indexes)."""
    family = model_family(model)
    if family == "vit":
        return list(model.blocks)
    if family == "swin":
        return [b for stage in model.layers for b in stage.blocks]
    if family == "resnet":
        return [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    return [b for s in model.stages for b in s.blocks]


def _vit_geometry(model: nn.Module) -> tuple[int, tuple[int, int] | None]:
    grid = getattr(model.patch_embed, "grid_size", None)
    grid = tuple(int(g) for g in grid) if grid is not None else None
    if getattr(model, "blocks_token_only", None) is not None:
        return 0, grid  # CaiT: the class token joins after the patch blocks
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = 1 if getattr(model, "cls_token", None) is not None else 0
    return int(prefix), grid


def run_site_noise(noise: nn.Module, x, channels_last: bool = False):
    """``noise(x)``; with ``channels_last`` (a Swin site), ``x`` is ``(B, H, W, C)`` and the noise acts on
    its ``(B, C, H, W)`` view (the layout the noise module knows for feature maps)."""
    if channels_last:
        return noise(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return noise(x)


def _first_arg_with(module, args, kwargs, channels_last):
    if getattr(module, "_noisynn_fuses_site", False):
        return None  # a swapped block applies its own noise site inside its fused forward
    if args:
        return (run_site_noise(module.noisynn, args[0], channels_last),) + tuple(args[1:]), kwargs
    if "x" in kwargs:
        kwargs = dict(kwargs, x=run_site_noise(module.noisynn, kwargs["x"], channels_last))
        return args, kwargs
    raise RuntimeError(f"{type(module).__name__} was called without an input tensor for the noise site")


def _replace_first_arg(module, args, kwargs):
    # Pre-hook (with_kwargs=True): the noise acts on the block's (or model's) input tensor.
    return _first_arg_with(module, args, kwargs, False)


def _replace_first_arg_channels_last(module, args, kwargs):
    return _first_arg_with(module, args, kwargs, True)


def _replace_output(module, args, output):
    return module.noisynn(output)


def _replace_output_channels_last(module, args, output):
    return run_site_noise(module.noisynn, output, True)


def apply_noisynn(model: nn.Module, config: Any = None) -> nn.Module:
    """Make ``model`` (a timm ViT, DeiT, DeiT-3, EVA, BEiT, CaiT, Swin, ResNet or ConvNeXt) a NoisyNN model in
    place; returns it.

    ``config`` is a :class:`NoiseConfig`, a dict of its fields or a kind name; ``None`` takes the
    default (the paper's optimal noise at the last block).  The noise replaces any applied before.
    Parameters and ``state_dict()`` keys are unchanged; :func:`remove_noisynn` reverts exactly.
    """
    cfg = NoiseConfig() if config is None else NoiseConfig.coerce(config)
    family = model_family(model)
    blocks = model_blocks(model)

    if cfg.position == "image":
        site, prefix, grid = model, 0, None
    else:
        n = len(blocks)
        if not -n <= cfg.layer < n:
            raise ConfigError(f"layer {cfg.layer} is out of range for {type(model).__name__} with {n} blocks; "
                              f"expected {-n} <= layer < {n}")
        block = blocks[cfg.layer]
        if family == "vit":
            prefix, grid = _vit_geometry(model)
        else:
            prefix, grid = 0, None
        if cfg.position == "attn_input":
            if family not in ("vit", "swin") or not isinstance(getattr(block, "norm1", None), nn.Module):
                raise UnsupportedModelError(
                    f"position='attn_input' needs a pre-norm transformer block with .norm1 (ViT family, Swin); "
                    f"{type(model).__name__} block {cfg.layer} is {type(block).__name__}. "
                    "Use position='block_input' or 'image'.")
            site = block.norm1
        elif cfg.position == "attn_output":
            attn = getattr(block, "attn", None)
            if family != "vit" or not isinstance(getattr(attn, "norm", None), nn.Module) \
                    or not hasattr(attn, "qkv"):
                raise UnsupportedModelError(
                    f"position='attn_output' needs a timm ViT block whose .attn is timm's Attention (with .qkv and "
                    f".norm); {type(model).__name__} block {cfg.layer} has .attn = {type(attn).__name__}. "
                    "Use position='block_input' or 'attn_input'.")
            # timm's Attention passes the merged-heads output through .norm (Identity unless scale_norm)
            # right before the projection: its output is the attention output.
            site = attn.norm
        else:
            site = block
    # Everything is validated: only now drop the noise applied before (a rejected config keeps it).
    remove_noisynn(model)
    if hasattr(site, _SITE_ATTR):
        raise ConfigError(f"{type(site).__name__} already has an attribute {_SITE_ATTR!r}; cannot attach the noise")

    site.add_module(_SITE_ATTR, NoiseInjection(cfg, prefix_tokens=prefix, grid=grid))
    # Follow the model's device and mode: a dense Q buffer moves with the model on the next .to().
    p = next(model.parameters(), None)
    if p is not None:
        getattr(site, _SITE_ATTR).to(p.device)
    getattr(site, _SITE_ATTR).train(model.training)
    state = _NoisynnState(cfg, site)
    channels_last = family == "swin" and cfg.position != "image"
    if cfg.position in ("attn_input", "attn_output"):
        state.handles.append(site.register_forward_hook(
            _replace_output_channels_last if channels_last else _replace_output))
    else:
        state.handles.append(site.register_forward_pre_hook(
            _replace_first_arg_channels_last if channels_last else _replace_first_arg, with_kwargs=True))
    object.__setattr__(model, _STATE_ATTR, state)
    return model


def remove_noisynn(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_noisynn`: removes the hook and the noise module.  A model without noise is
    returned unchanged."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for h in state.handles:
        h.remove()
    if _SITE_ATTR in state.site._modules:
        del state.site._modules[_SITE_ATTR]
    object.__delattr__(model, _STATE_ATTR)
    return model


def noise_config(model: nn.Module) -> NoiseConfig | None:
    """The NoiseConfig applied to ``model``, or ``None`` for a model without noise."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.config


def site_noise(module: nn.Module) -> nn.Module | None:
    """The noise module attached to ``module`` by :func:`apply_noisynn` (``module`` being the noise
    site: a block, a norm, an attention's ``.norm`` or the model), or ``None``."""
    return module._modules.get(_SITE_ATTR)


def noise_module(model: nn.Module) -> nn.Module | None:
    """The noise module that :func:`apply_noisynn` attached somewhere in ``model``, or ``None``."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else site_noise(state.site)


def replace_noise_module(model: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` where the noise module of ``model`` (from :func:`apply_noisynn`) is, keeping the site
    and its hook (e.g. a baseline implementation of the same noise); returns the old module.  Raises
    :class:`ConfigError` for a model without noise."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ConfigError(f"{type(model).__name__} has no noise to replace; expected a model from apply_noisynn "
                          "or a noisy_* timm model")
    old = state.site._modules[_SITE_ATTR]
    state.site._modules[_SITE_ATTR] = new
    return old
