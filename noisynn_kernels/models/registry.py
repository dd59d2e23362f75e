"""timm registrations: ``timm.create_model('noisy_vit_base_patch16_224', noise=...)`` and friends.

Each ``noisy_*`` name builds the plain timm model it is named after (same architecture, same
``state_dict()`` keys, same pretrained weights and pretrained cfgs) and applies the noise with
:func:`~noisynn_kernels.apply_noisynn`.  ``noise`` is a NoiseConfig, a dict of its fields or a kind
name; left out, it is the paper's default (optimal noise at the last block); ``noise=False`` builds
the model with no noise site.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from timm.models import generate_default_cfgs, get_arch_pretrained_cfgs, register_model

from .patch import apply_noisynn

__all__ = ["NOISY_MODELS", "base_model_name"]

#: Registered noisy model name -> the timm architecture it wraps.
NOISY_MODELS: dict[str, str] = {
    **{f"noisy_vit_{size}_patch16_{res}": f"vit_{size}_patch16_{res}"
       for size in ("tiny", "small", "base", "large") for res in (224, 384)},
    **{f"noisy_resnet{depth}": f"resnet{depth}" for depth in (18, 34, 50, 101)},
}


def base_model_name(name: str) -> str:
    """The plain timm architecture behind a registered noisy model name (tag stripped)."""
    return NOISY_MODELS[name.split(".", 1)[0]]


def _default_cfgs() -> dict[str, Any]:
    # Mirror every pretrained cfg of the base architecture, in timm's order (its default first), so
    # `noisy_vit_base_patch16_224.augreg_in21k` and data-config lookups behave as for the base name.
    cfgs = {}
    for name, base in NOISY_MODELS.items():
        for full_name, cfg in get_arch_pretrained_cfgs(base).items():
            tag = full_name.split(".", 1)[1] if "." in full_name else ""
            cfgs[f"{name}.{tag}" if tag else name] = replace(cfg, architecture=name)
    return cfgs


default_cfgs = generate_default_cfgs(_default_cfgs())


def _entrypoint(name: str, base: str) -> Callable[..., Any]:
    def create(pretrained: bool = False, noise: Any = None, **kwargs: Any):
        import timm  # deferred: timm imports this module through its registry only via noisynn_kernels

        model = timm.create_model(base, pretrained=pretrained, **kwargs)
        if noise is not False:
            apply_noisynn(model, noise)
        return model

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = (f"{base} with NoisyNN noise (timm architecture and weights unchanged). "
                      "noise: NoiseConfig, dict of its fields, kind name, or False for none.")
    return create


for _name, _base in NOISY_MODELS.items():
    globals()[_name] = register_model(_entrypoint(_name, _base))
