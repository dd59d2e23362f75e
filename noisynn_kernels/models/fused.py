"""Swap fused ``mix_add_layernorm`` into a timm transformer in place, and back.

A pre-norm transformer block runs ``x = x + attn(norm1(x))`` and ``x = x + mlp(norm2(x))``.  After
:func:`swap_fused_ops` every residual add runs together with the LayerNorm that follows it as one
:func:`~noisynn_kernels.mix_add_layernorm` call, and a linear noise site folds into the same call:
``block_input`` noise mixes the residual stream (``residual_out = M s``), ``attn_input`` noise mixes
the LayerNorm-1 output (``mix_after_norm``), and on a ViT ``attn_output`` noise runs attention through
:func:`~noisynn_kernels.functional.noisy_attention` with the mix fused into its epilogue (elsewhere
attention stays timm's and the noise applies through its hook).  Random noises at a site are applied
unfused, where the hooks would apply them, and draw exactly what the unswapped model draws.

What is fused, per family (block classes swapped; anything else raises
:class:`~noisynn_kernels.UnsupportedModelError` naming the block type):

- **ViT, DeiT, DeiT-3, CaiT** (``nn.Sequential`` stacks of ``vision_transformer.Block`` /
  ``cait.LayerScaleBlock``): both adds of every block; the MLP add of block ``i`` runs with
  ``norm1`` of block ``i + 1`` (the stack carries ``(residual, pending branch output)`` from block to
  block; only the last add is a plain one).  CaiT: its patch blocks; the class-attention blocks
  stay timm's.
- **Swin** (``SwinTransformerBlock`` in each stage's ``nn.Sequential``): as a ViT within each stage,
  on the stage's ``(B, H*W, C)`` view; the stage's patch merging (and its LayerNorm) stays timm's.
  Linear noise with ``axis='rows'`` takes the stage's ``(H, W)`` as its grid.
- **EVA / EVA-02, BEiT** (``ModuleList`` stacks of ``eva.EvaBlock`` / ``beit.Block``, which the model
  calls one by one with rotary / relative-position arguments): within each block, the attention add
  with ``norm2`` (and ``norm1`` through the same op); the MLP add is a plain one.

Module state, not patched methods: the class of every fused block becomes a subclass defined here
(``FusedViTBlock`` etc.), an ``nn.Sequential`` stack becomes a :class:`FusedBlocks`, and the module that
owns timm's ``grad_checkpointing`` flag (the model; a Swin stage) becomes a subclass whose flag the
fused blocks honour.  So a swapped model survives ``torch.save`` / ``torch.load``, ``pickle`` and
``copy.deepcopy``, every parameter, buffer and ``state_dict()`` key is untouched, and
:func:`unswap_fused_ops` restores every class.  The noise is read from the model at every call, so
``apply_noisynn`` / ``remove_noisynn`` work before or after the swap.

Each fused step is the block module's own ``__call__``, so hooks on the blocks run, among them those of
FSDP2 (``fully_shard`` per block) and of ``DistributedDataParallel``.

Gradient checkpointing: ``model.set_grad_checkpointing(True)`` (before or after the swap) makes every
fused block checkpoint its own step (``torch.utils.checkpoint``, ``use_reentrant=False``), per block as
timm does.  The recomputation replays the noise exactly: the default RNGs are restored by
``torch.utils.checkpoint``, and the generators of seeded noise (``NoiseConfig.seed``) by the fused block.
timm itself then sees ``grad_checkpointing`` as ``False`` (the fused blocks do the checkpointing); ask
:func:`grad_checkpointing_enabled` instead.  ``torch.compile`` traces the checkpointed blocks (also with
``fullgraph=True``), except a block holding seeded random noise: the graph breaks there and that block
runs eagerly (a compiled checkpoint cannot replay a generator object).

Hooks on a block run; inside an ``nn.Sequential`` stack they see the block called as
``block(residual, pending=p, carry=True)`` returning ``(residual, pending)`` (see :class:`FusedBlocks`).
"""

from __future__ import annotations

import contextlib

import torch
from timm.models import beit as _beit
from timm.models import cait as _cait
from timm.models import deit as _deit
from timm.models import eva as _eva
from timm.models import swin_transformer as _swin
from timm.models import vision_transformer as _vit
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UnsupportedModelError
from ..functional import mix_add_layernorm, noisy_attention
from ..nn import NOT_SCRIPTABLE_MESSAGE, NoiseInjection
from ..ops import noisy_attention as noisy_attention_op
from .patch import model_blocks, model_family, run_site_noise, site_noise

__all__ = ["swap_fused_ops", "unswap_fused_ops", "is_swapped", "grad_checkpointing_enabled", "FusedBlocks",
           "FusedViTBlock", "FusedEvaBlock", "FusedBeitBlock", "FusedCaitBlock", "FusedSwinBlock",
           "SWAP_FAMILIES"]

_BACKEND_ATTR = "_noisynn_fused_backend"
_CKPT_ATTR = "_noisynn_checkpoint"

#: What :func:`swap_fused_ops` fuses, for error messages.
SWAP_FAMILIES = ("ViT (class token, register tokens, global average pool), DeiT, DeiT-3, CaiT (patch blocks), "
                 "Swin (SwinTransformerBlock), EVA / EVA-02 (EvaBlock), BEiT")


def _active_site(module: nn.Module):
    site = site_noise(module)
    if site is None or not site.config.active(site.training):
        return None
    return site


def _attention(attn: nn.Module, x, backend):
    """``attn(x)`` of a timm ViT ``Attention``, with an active linear ``attn_output`` noise fused into the
    attention kernel (:func:`~noisynn_kernels.functional.noisy_attention`).  timm's Attention runs
    unchanged (the noise then applies through its hook) when there is no such site, when its ``.norm``
    is not Identity (the site is after that norm), or in training with attention dropout (the kernel
    has none)."""
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


def _add(a, b):
    if a.dtype != b.dtype:  # autocast: a low-precision branch output joins the fp32 stream
        dt = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dt), b.to(dt)
    return a + b


def _seeded_sites(block: nn.Module) -> list:
    return [m for m in block.modules() if isinstance(m, NoiseInjection) and m.config.seed is not None]


def _replay_contexts(block: nn.Module):
    """``context_fn`` of the checkpointed step: the recomputation sees the generators of the seeded noise
    modules in ``block`` as they were when the forward began (a generator not made yet is made again from
    the seed), and they are left where the forward left them."""
    sites = _seeded_sites(block)
    saved: list[dict] = []

    @contextlib.contextmanager
    def forward():
        # (NoiseInjection keeps one generator per device in ._generators, made on first use)
        saved[:] = [{dev: g.get_state() for dev, g in s._generators.items()} for s in sites]
        yield

    @contextlib.contextmanager
    def recompute():
        after = [s._generators for s in sites]
        for s, states in zip(sites, saved):
            fresh = {}
            for dev, state in states.items():
                fresh[dev] = torch.Generator(device=dev)
                fresh[dev].set_state(state)
            s._generators = fresh
        try:
            yield
        finally:
            for s, gens in zip(sites, after):
                s._generators = gens

    return forward(), recompute()


class _FusedBlock:
    """The fused forward shared by the swapped block classes (a mixin in front of the timm block).

    ``block(x, *args, **kwargs)`` is timm's block call (same arguments, same result).  Inside a
    :class:`FusedBlocks` stack the block is called as ``block(residual, pending=p, carry=True)`` and
    returns ``(residual, pending)``: the residual stream and this block's MLP output, not yet added (the
    next block adds it with its ``norm1``)."""

    _noisynn_fuses_site = True  # patch.py's block pre-hook leaves the block_input site to this forward
    _channels_last = False      # Swin: (B, H, W, C) stream

    def forward(self, x, *args, pending=None, carry: bool = False, **kwargs):
        if getattr(self, _CKPT_ATTR, False) and torch.is_grad_enabled():
            extra = {}
            if _seeded_sites(self):  # (torch.compile traces checkpoint only with the default context_fn)
                if torch.compiler.is_compiling():
                    raise UnsupportedModelError(
                        "torch.compile of a block with seeded random noise (NoiseConfig.seed) and gradient "
                        "checkpointing: the recomputation must replay the noise module's own generator, which "
                        "a compiled checkpoint cannot; use an unseeded noise, no checkpointing, or eager mode")
                extra["context_fn"] = lambda: _replay_contexts(self)
            res, pending = checkpoint(self._fused_step, x, pending, args, kwargs, use_reentrant=False, **extra)
        else:
            res, pending = self._fused_step(x, pending, args, kwargs)
        if carry:
            return res, pending
        return res if pending is None else _add(pending, res)

    def _geometry(self, site, res):
        return site.prefix_tokens, site.grid

    def _add_norm(self, x, res, norm, backend, mix=None, prefix=0, grid=None, after=False):
        shape = res.shape
        tokens = (lambda t: t.reshape(shape[0], -1, shape[-1])) if self._channels_last else (lambda t: t)
        if x is not None and x.dtype != res.dtype:
            dt = torch.promote_types(x.dtype, res.dtype)
            x, res = x.to(dt), res.to(dt)
        a, b = (tokens(res), None) if x is None else (tokens(x), tokens(res))
        normed, res = mix_add_layernorm(a, b, norm.weight, norm.bias, norm.eps, mix=mix, prefix_tokens=prefix,
                                        grid=grid, mix_after_norm=after, backend=backend)
        return normed.reshape(shape), res.reshape(shape)

    def _fused_step(self, res, pending, args, kwargs):
        backend = getattr(self, _BACKEND_ATTR, None)
        mix, after, prefix, grid, post = None, False, 0, None, None
        site = _active_site(self)
        if site is not None and site.config.is_linear:
            site.warn_if_local_batch_mix()
            mix = site.config
            prefix, grid = self._geometry(site, res)
        elif site is not None:  # random noise on the residual stream entering the block
            res = run_site_noise(site, res if pending is None else _add(pending, res), self._channels_last)
            pending = None
        site = _active_site(self.norm1)
        if site is not None and site.config.is_linear:
            site.warn_if_local_batch_mix()
            mix, after = site.config, True
            prefix, grid = self._geometry(site, res)
        elif site is not None:
            post = site
        normed, res = self._add_norm(pending, res, self.norm1, backend, mix, prefix, grid, after)
        if post is not None:
            normed = run_site_noise(post, normed, self._channels_last)
        branch = self._attn_branch(normed, backend, args, kwargs)
        normed, res = self._add_norm(branch, res, self.norm2, backend)
        return res, self._mlp_branch(normed)

    def __prepare_scriptable__(self):
        raise UnsupportedModelError("swap_fused_ops: " + NOT_SCRIPTABLE_MESSAGE)


def _no_extras(args, kwargs) -> bool:
    return all(v is None or v is False for v in (*args, *kwargs.values()))


class FusedViTBlock(_FusedBlock, _vit.Block):
    """A swapped ``timm.models.vision_transformer.Block`` (ViT, DeiT, DeiT-3): see :mod:`.fused`."""

    def _attn_branch(self, normed, backend, args, kwargs):
        y = _attention(self.attn, normed, backend) if _no_extras(args, kwargs) else self.attn(normed, *args, **kwargs)
        return self.drop_path1(self.ls1(y))

    def _mlp_branch(self, normed):
        return self.drop_path2(self.ls2(self.mlp(normed)))


class _GammaBranches:
    # EVA and BEiT: layer scale as optional gamma_1 / gamma_2 parameters
    def _attn_branch(self, normed, backend, args, kwargs):
        y = self.attn(normed, *args, **kwargs)
        return self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)

    def _mlp_branch(self, normed):
        y = self.mlp(normed)
        return self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)


class FusedEvaBlock(_FusedBlock, _GammaBranches, _eva.EvaBlock):
    """A swapped ``timm.models.eva.EvaBlock`` (EVA, EVA-02: rotary embeddings, SwiGLU): see :mod:`.fused`."""


class FusedBeitBlock(_FusedBlock, _GammaBranches, _beit.Block):
    """A swapped ``timm.models.beit.Block``: see :mod:`.fused`."""


class FusedCaitBlock(_FusedBlock, _cait.LayerScaleBlock):
    """A swapped ``timm.models.cait.LayerScaleBlock`` (CaiT's patch blocks): see :mod:`.fused`."""

    def _attn_branch(self, normed, backend, args, kwargs):
        return self.drop_path(self.gamma_1 * self.attn(normed, *args, **kwargs))

    def _mlp_branch(self, normed):
        return self.drop_path(self.gamma_2 * self.mlp(normed))


class FusedSwinBlock(_FusedBlock, _swin.SwinTransformerBlock):
    """A swapped ``timm.models.swin_transformer.SwinTransformerBlock``: the stream stays ``(B, H, W, C)``;
    the adds and LayerNorms run on its ``(B, H*W, C)`` view.  See :mod:`.fused`."""

    _channels_last = True

    def _geometry(self, site, res):
        return 0, (int(res.shape[1]), int(res.shape[2]))

    def _attn_branch(self, normed, backend, args, kwargs):
        return self.drop_path1(self._attn(normed))

    def _mlp_branch(self, normed):
        return self.drop_path2(self.mlp(normed))


_FUSED_BLOCKS: dict[type, type] = {
    _vit.Block: FusedViTBlock,
    _eva.EvaBlock: FusedEvaBlock,
    _beit.Block: FusedBeitBlock,
    _cait.LayerScaleBlock: FusedCaitBlock,
    _swin.SwinTransformerBlock: FusedSwinBlock,
}


class FusedBlocks(nn.Sequential):
    """An ``nn.Sequential`` stack of swapped blocks (ViT, DeiT, CaiT, a Swin stage): its ``forward``
    carries ``(residual, pending branch output)`` from block to block, so that the MLP add of one block
    runs with the next block's ``norm1`` (:func:`swap_fused_ops`).  Each block is called through its own
    ``__call__`` (its hooks, FSDP's among them, run)."""

    def forward(self, x):
        res, pending = x, None
        for blk in self:
            if isinstance(blk, _FusedBlock):
                res, pending = blk(res, pending=pending, carry=True)
            else:  # (a block appended after the swap)
                res, pending = blk(res if pending is None else _add(pending, res)), None
        return res if pending is None else _add(pending, res)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this before compiling a module: a clear error here instead of a
        # TorchScript frontend error deep inside the fused forward.
        raise UnsupportedModelError("swap_fused_ops: " + NOT_SCRIPTABLE_MESSAGE)


class _ChecksBlocks:
    """The owner of timm's ``grad_checkpointing`` flag, swapped: setting it (``set_grad_checkpointing``)
    switches the fused blocks' own checkpointing; timm reads ``False`` and leaves the blocks to it."""

    @property
    def grad_checkpointing(self) -> bool:
        """Always ``False`` for timm's forward: the fused blocks checkpoint themselves (see
        :func:`grad_checkpointing_enabled`)."""
        return False

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        for blk in self.blocks:
            if isinstance(blk, _FusedBlock):
                setattr(blk, _CKPT_ATTR, bool(enable))


class FusedVisionTransformer(_ChecksBlocks, _vit.VisionTransformer):
    """A swapped ``VisionTransformer`` (ViT, DeiT, DeiT-3): its ``grad_checkpointing`` drives the fused blocks."""


class FusedVisionTransformerDistilled(_ChecksBlocks, _deit.VisionTransformerDistilled):
    """A swapped DeiT with a distillation token: its ``grad_checkpointing`` drives the fused blocks."""


class FusedEva(_ChecksBlocks, _eva.Eva):
    """A swapped ``Eva`` (EVA, EVA-02): its ``grad_checkpointing`` drives the fused blocks."""


class FusedBeit(_ChecksBlocks, _beit.Beit):
    """A swapped ``Beit``: its ``grad_checkpointing`` drives the fused blocks."""


class FusedCait(_ChecksBlocks, _cait.Cait):
    """A swapped ``Cait``: its ``grad_checkpointing`` drives the fused patch blocks."""


class FusedSwinStage(_ChecksBlocks, _swin.SwinTransformerStage):
    """A swapped ``SwinTransformerStage``: its ``grad_checkpointing`` drives its fused blocks."""


_FUSED_OWNERS: dict[type, type] = {
    _vit.VisionTransformer: FusedVisionTransformer,
    _deit.VisionTransformerDistilled: FusedVisionTransformerDistilled,
    _eva.Eva: FusedEva,
    _beit.Beit: FusedBeit,
    _cait.Cait: FusedCait,
    _swin.SwinTransformerStage: FusedSwinStage,
}
_BASE_OF = {fused: base for base, fused in (*_FUSED_BLOCKS.items(), *_FUSED_OWNERS.items())}


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _stacks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(owner of the grad_checkpointing flag, block container)`` pairs of ``model``."""
    try:
        family = model_family(model)
    except UnsupportedModelError:
        family = None
    if family == "vit":
        return [(model, model.blocks)]
    if family == "swin":
        return [(stage, stage.blocks) for stage in model.layers]
    met = f"{type(model).__name__} (blocks: {_name(type(model_blocks(model)[0]))})" if family else _name(type(model))
    raise UnsupportedModelError(f"swap_fused_ops fuses the transformer blocks of {SWAP_FAMILIES}; got {met}")


def _check(model: nn.Module, stacks) -> None:
    for owner, blocks in stacks:
        if type(blocks) not in (nn.Sequential, FusedBlocks, nn.ModuleList):
            raise UnsupportedModelError(f"swap_fused_ops needs the blocks in an nn.Sequential or nn.ModuleList, "
                                        f"got {_name(type(blocks))}")
        for i, blk in enumerate(blocks):
            if type(blk) not in _FUSED_BLOCKS and type(blk) not in _BASE_OF:
                raise UnsupportedModelError(
                    f"swap_fused_ops cannot fuse block {i} of {type(model).__name__}: it is {_name(type(blk))}. "
                    f"Supported: pre-norm blocks of {SWAP_FAMILIES}")
            for name in ("norm1", "norm2"):
                norm = getattr(blk, name)
                if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
                    raise UnsupportedModelError(f"swap_fused_ops fuses LayerNorm over the last dim; block {i}.{name} "
                                                f"of {type(model).__name__} is {_name(type(norm))}")
        if type(owner) not in _FUSED_OWNERS and type(owner) not in _BASE_OF:
            raise UnsupportedModelError(
                f"swap_fused_ops needs a timm model class it knows (for gradient checkpointing); "
                f"{type(model).__name__} holds its blocks in {_name(type(owner))}. Supported: {SWAP_FAMILIES}")


def swap_fused_ops(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Run the residual add + LayerNorm pairs of a timm transformer through the fused
    ``mix_add_layernorm`` (noise site or not), in place; returns the model.  What is fused per family:
    :mod:`noisynn_kernels.models.fused`.

    ``backend`` (``reference``, ``triton``, ...; ``None``: chosen per device at each call, see
    :func:`noisynn_kernels.backend_info`) is checked when the op runs, and an unavailable backend
    raises :class:`~noisynn_kernels.BackendUnavailableError`.  Raises
    :class:`~noisynn_kernels.UnsupportedModelError` naming the block type for anything but the pre-norm
    blocks of ViT, DeiT, DeiT-3, CaiT, Swin, EVA / EVA-02 and BEiT (with LayerNorm).  Parameters and
    ``state_dict()`` keys are unchanged; gradient checkpointing set before or after the swap is kept.
    Swap before wrapping the model (``fully_shard``, ``DistributedDataParallel``, ``torch.compile``).
    """
    stacks = _stacks(model)
    _check(model, stacks)
    for owner, blocks in stacks:  # everything is checked: only now change classes
        ckpt = grad_checkpointing_enabled(owner) if type(owner) in _BASE_OF else bool(
            owner.__dict__.pop("grad_checkpointing", False))
        owner.__class__ = _FUSED_OWNERS.get(type(owner), type(owner))
        if type(blocks) is nn.Sequential:
            blocks.__class__ = FusedBlocks
        for blk in blocks:
            blk.__class__ = _FUSED_BLOCKS.get(type(blk), type(blk))
            setattr(blk, _BACKEND_ATTR, backend)
        owner.grad_checkpointing = ckpt
    return model


def unswap_fused_ops(model: nn.Module) -> nn.Module:
    """Undo :func:`swap_fused_ops` (every class restored, timm's ``grad_checkpointing`` flag as the
    fused blocks had it); a model that was not swapped is returned unchanged."""
    for m in list(model.modules()):
        if isinstance(m, _ChecksBlocks) and type(m) in _BASE_OF:
            enabled = grad_checkpointing_enabled(m)
            m.__class__ = _BASE_OF[type(m)]
            m.grad_checkpointing = enabled
    for m in list(model.modules()):
        if type(m) is FusedBlocks:
            m.__class__ = nn.Sequential
        elif type(m) in _BASE_OF:
            m.__class__ = _BASE_OF[type(m)]
            m.__dict__.pop(_BACKEND_ATTR, None)
            m.__dict__.pop(_CKPT_ATTR, None)
    return model


def is_swapped(model: nn.Module) -> bool:
    """Whether :func:`swap_fused_ops` is in effect on ``model`` (any of its blocks is a fused one)."""
    return any(isinstance(m, _FusedBlock) for m in model.modules())


def grad_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether the fused blocks of a swapped ``model`` (or of a Swin stage) checkpoint themselves
    (``model.set_grad_checkpointing``); for a model that is not swapped, timm's own flag."""
    fused = [m for m in model.modules() if isinstance(m, _FusedBlock)]
    if fused:
        return any(getattr(m, _CKPT_ATTR, False) for m in fused)
    return bool(getattr(model, "grad_checkpointing", False))
