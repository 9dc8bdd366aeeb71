"""timm's DeiT-Tiny, PiT-Ti and Swin-T made recursive, registered with timm.

Each variant builds its base model with timm (its pretrained weights included, when
asked: shared blocks keep their run's first block) and rewrites it with
`make_recursive`::

    model = timm.create_model("deit_tiny_rec_sliced_patch16_224", num_classes=10)
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from torch import nn

from vitblocks.models.plug import make_recursive

_PER_LOOP = dict(loops=2, mix="per_loop")
_SHARED = dict(loops=2, share=True, mix="per_loop")

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "deit_tiny_rec_patch16_224": ("deit_tiny_patch16_224", _PER_LOOP),
    "deit_tiny_rec_sliced_patch16_224": ("deit_tiny_patch16_224", dict(_PER_LOOP, groups=(4, 2))),
    "deit_tiny_shared_patch16_224": ("deit_tiny_patch16_224", _SHARED),
    "pit_ti_rec_224": ("pit_ti_224", _PER_LOOP),
    "pit_ti_rec_sliced_224": ("pit_ti_224", dict(_PER_LOOP, groups=((8, 2), (4, 1), (1, 1)))),
    "pit_ti_shared_224": ("pit_ti_224", _SHARED),
    "swin_tiny_rec_patch4_window7_224": ("swin_tiny_patch4_window7_224", _PER_LOOP),
    "swin_tiny_shared_patch4_window7_224": ("swin_tiny_patch4_window7_224", _SHARED),
}
"""Registered recursive variants: name -> (base timm model, make_recursive arguments)."""


def _variant_cfg(base: str) -> dict[str, Any]:
    cfg = get_pretrained_cfg(base)
    keep = ("input_size", "crop_pct", "interpolation", "mean", "std", "first_conv", "classifier", "num_classes",
            "pool_size", "fixed_input_size")
    return {k: getattr(cfg, k) for k in keep}


default_cfgs = generate_default_cfgs({f"{name}.untrained": _variant_cfg(base) for name, (base, _) in VARIANTS.items()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    base, recursion = VARIANTS[variant]
    kwargs.pop("pretrained_cfg", None)  # the variant's cfg; the base resolves its own (overlays still apply)
    model = timm.create_model(base, pretrained=pretrained, **kwargs)
    make_recursive(model, **recursion)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    model.pretrained_cfg = {**cfg, "architecture": variant, "tag": "", "hf_hub_id": None, "url": ""}
    return model


@register_model
def deit_tiny_rec_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """DeiT-Tiny, every block applied twice with a NonLinearMix after each application."""
    return _create("deit_tiny_rec_patch16_224", pretrained, **kwargs)


@register_model
def deit_tiny_rec_sliced_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """DeiT-Tiny recursive as above, with sliced attention: 4 groups, then 2."""
    return _create("deit_tiny_rec_sliced_patch16_224", pretrained, **kwargs)


@register_model
def deit_tiny_shared_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """DeiT-Tiny with each pair of consecutive blocks sharing one block's weights."""
    return _create("deit_tiny_shared_patch16_224", pretrained, **kwargs)


@register_model
def pit_ti_rec_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """PiT-Ti, every block applied twice with a NonLinearMix after each application."""
    return _create("pit_ti_rec_224", pretrained, **kwargs)


@register_model
def pit_ti_rec_sliced_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """PiT-Ti recursive as above, with SReT's group schedule [8-4-1, 2-1-1]."""
    return _create("pit_ti_rec_sliced_224", pretrained, **kwargs)


@register_model
def pit_ti_shared_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """PiT-Ti with each pair of consecutive blocks sharing one block's weights."""
    return _create("pit_ti_shared_224", pretrained, **kwargs)


@register_model
def swin_tiny_rec_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Swin-T, every (W-MSA, SW-MSA) block pair applied twice with a NonLinearMix after each."""
    return _create("swin_tiny_rec_patch4_window7_224", pretrained, **kwargs)


@register_model
def swin_tiny_shared_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Swin-T with each two consecutive block pairs sharing one pair's weights."""
    return _create("swin_tiny_shared_patch4_window7_224", pretrained, **kwargs)
