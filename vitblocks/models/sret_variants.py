"""The paper's SReT variants, registered with timm.

Each variant is one architecture; weights of the same architecture trained differently
are pretrained tags, as in timm: `sret_t.in1k` (supervised) and `sret_t.distill_in1k`
(soft-label distillation). The old names `sret_t_distill` etc. still work, with timm's
deprecation warning. Reported accuracies are data (`paper_results.csv`), not code.

    model = timm.create_model("sret_t", num_classes=100, img_size=224, drop_path_rate=0.1)

`pretrained=True` loads the file named by `pretrained_cfg_overlay=dict(file=...)`, in the
official code's layout or in vitblocks' own (the position map is resized to the model's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_model_deprecations

from vitblocks.models.official import convert_official_state_dict, is_official_state_dict, resize_position_weight
from vitblocks.models.routed_weights import with_routers
from vitblocks.models.sret import SReT, stage_grids

_WEIGHT_KEYS = ("file", "url", "state_dict", "hf_hub_id")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SReT) -> dict[str, torch.Tensor]:
    """Adapt a state dict to `model` for timm's pretrained loading.

    Args:
        state_dict: Weights in the official code's layout or in vitblocks' own.
        model: The model to load into.

    Returns:
        Weights in vitblocks layout, the position map resized to the model's grid; a
        static SReT's weights into a routed SReT keep their blocks under the routing
        and take the model's fresh routers (`vitblocks.models.routed_weights`).
    """
    if is_official_state_dict(state_dict):
        return convert_official_state_dict(state_dict, model)
    return resize_position_weight(with_routers(dict(state_dict), model), model)


def _create_sret(variant: str, pretrained: bool = False, **kwargs: Any) -> SReT:
    if pretrained:
        sources = [kwargs.get("pretrained_cfg_overlay") or {}, kwargs.get("pretrained_cfg")]
        if not any(isinstance(s, dict) and any(s.get(k) for k in _WEIGHT_KEYS) for s in sources):
            raise ValueError(
                f"{variant} has no weights to download. Load an official SReT checkpoint with "
                f"vitblocks.models.official.load_official_checkpoint(path, {variant!r}), or any checkpoint with "
                f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file=path))"
            )
        for source in sources:
            location = source.get("file") if isinstance(source, dict) else None
            if location and not Path(location).exists():  # timm would raise a FileNotFoundError without a message
                raise FileNotFoundError(f"{variant}: no weights file at {str(location)!r} (pretrained_cfg file)")
    out_indices = kwargs.pop("out_indices", (0, 1, 2))
    return build_model_with_cfg(
        SReT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(release: str = "", size: int = 224, **kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg: `release` names the official model whose released weights the tag is."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, size, size),
        "pool_size": stage_grids((size, size), 3)[-1],
        "crop_pct": 0.875 if size == 224 else 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1",
        "classifier": "head",
        "license": "mit",
        "origin_url": "https://github.com/szq0214/SReT",
        "paper_name": "Sliced Recursive Transformer",
        "paper_ids": "arXiv:2111.05297",
        "notes": (f"weights: the official {release} release (linked from the SReT README); load the file with "
                  "vitblocks.models.official.load_official_checkpoint or pretrained_cfg_overlay=dict(file=...)",)
        if release else ("no official weights were released for this variant",),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "sret_t.in1k": _cfg("SReT_T"),
    "sret_t.distill_in1k": _cfg("SReT_T_Distill"),
    "sret_t_unsliced.in1k": _cfg("SReT_*T (without slice)"),
    "sret_t_unsliced.distill_in1k": _cfg("SReT_*T_Distill (without slice)"),
    "sret_lt.in1k": _cfg(),
    "sret_lt.distill_in1k": _cfg("SReT_LT_Distill"),
    "sret_lt_unsliced.in1k": _cfg("SReT_*LT (without slice)"),
    "sret_lt_unsliced.distill_in1k": _cfg("SReT_*LT_Distill (without slice)"),
    "sret_lt_g16_14_1.in1k": _cfg("SReT_LT [16-14-1,1-1-1]"),
    "sret_s.in1k": _cfg("SReT_S"),
    "sret_s_unsliced.in1k": _cfg("SReT_*S (without slice)"),
    "sret_t_unsliced_384.in1k": _cfg("SReT_*T_Distill_Finetune384", size=384),
    "sret_s_unsliced_384.in1k": _cfg("SReT_*S_Distill_Finetune384", size=384),
    "sret_s_unsliced_512.in1k": _cfg("SReT_*S_Distill_Finetune512", size=512),
})

_TINY = dict(embed_dims=(64, 128, 256), num_heads=(2, 4, 8), unique_blocks=(2, 5, 3), mlp_ratio=3.6, mix_mlp_ratio=1.0)
_LARGER_TINY = dict(_TINY, mlp_ratio=4.0)
_SMALL = dict(
    embed_dims=(126, 252, 504), num_heads=(3, 6, 12), unique_blocks=(2, 5, 3), mlp_ratio=3.0, mix_mlp_ratio=2.0,
    drop_path_rate=0.2,
)
_SLICED = dict(groups=((8, 2), (4, 1), (1, 1)))
_UNSLICED = dict(groups=((1,), (1,), (1,)))


def _build(variant: str, pretrained: bool, kwargs: dict[str, Any], *archs: dict[str, Any]) -> SReT:
    """Build `variant` from architecture dicts (later ones win) and the caller's kwargs (which win over all)."""
    merged: dict[str, Any] = {}
    for arch in archs:
        merged.update(arch)
    return _create_sret(variant, pretrained=pretrained, **{**merged, **kwargs})


@register_model
def sret_t(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-T, groups [8-4-1, 2-1-1]: 4,755,979 params, 1.11 GMACs at 224."""
    return _build("sret_t", pretrained, kwargs, _TINY, _SLICED)


@register_model
def sret_t_unsliced(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-T without slicing: 1.37 GMACs at 224."""
    return _build("sret_t_unsliced", pretrained, kwargs, _TINY, _UNSLICED)


@register_model
def sret_lt(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-LT, groups [8-4-1, 2-1-1]: 4,988,024 params, 1.16 GMACs at 224."""
    return _build("sret_lt", pretrained, kwargs, _LARGER_TINY, _SLICED)


@register_model
def sret_lt_unsliced(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-LT without slicing: 1.42 GMACs at 224."""
    return _build("sret_lt_unsliced", pretrained, kwargs, _LARGER_TINY, _UNSLICED)


@register_model
def sret_lt_g16_14_1(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-LT, groups [16-14-1, 1-1-1]: 1.23 GMACs at 224."""
    return _build("sret_lt_g16_14_1", pretrained, kwargs, _LARGER_TINY, dict(groups=((16, 1), (14, 1), (1, 1))))


@register_model
def sret_s(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-S, groups [8-4-1, 2-1-1]: 20,899,692 params, 4.17 GMACs at 224."""
    return _build("sret_s", pretrained, kwargs, _SMALL, _SLICED)


@register_model
def sret_s_unsliced(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-S without slicing: 4.67 GMACs at 224."""
    return _build("sret_s_unsliced", pretrained, kwargs, _SMALL, _UNSLICED)


@register_model
def sret_t_unsliced_384(pretrained: bool = False, **kwargs: Any) -> SReT:
    """Unsliced SReT-T at 384: 4,853,259 params, 6.41 GMACs."""
    return _build("sret_t_unsliced_384", pretrained, kwargs, _TINY, _UNSLICED, dict(img_size=384))


@register_model
def sret_s_unsliced_384(pretrained: bool = False, **kwargs: Any) -> SReT:
    """Unsliced SReT-S at 384: 21,091,212 params, 18.44 GMACs."""
    return _build("sret_s_unsliced_384", pretrained, kwargs, _SMALL, _UNSLICED, dict(img_size=384))


@register_model
def sret_s_unsliced_512(pretrained: bool = False, **kwargs: Any) -> SReT:
    """Unsliced SReT-S at 512: 21,317,004 params, 42.67 GMACs."""
    return _build("sret_s_unsliced_512", pretrained, kwargs, _SMALL, _UNSLICED, dict(img_size=512))


register_model_deprecations(__name__, {
    "sret_t_distill": "sret_t.distill_in1k",
    "sret_lt_distill": "sret_lt.distill_in1k",
    "sret_t_unsliced_distill": "sret_t_unsliced.distill_in1k",
    "sret_lt_unsliced_distill": "sret_lt_unsliced.distill_in1k",
})
