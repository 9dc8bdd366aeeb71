"""timm's DeiT-Tiny, PiT-Ti and Swin-T made recursive, registered with timm.

Each variant builds its base model with timm and rewrites it with `make_recursive`:

    model = timm.create_model("deit_tiny_rec_sliced_patch16_224", num_classes=10)

With `pretrained=True` the weights come from where timm's own paths say: a file
(`pretrained_cfg_overlay=dict(file=...)`, .pth or .safetensors), a state dict, or a local
folder written by `timm.models.save_for_hf` (`timm.create_model("local-dir:/path")`).
Token routing (`vitblocks.layers.TokenRouting`) of the shared blocks is set or replaced
with `routing=`, as for SReT: `timm.create_model("deit_tiny_rec_patch16_224",
routing={"mode": "token"})`; `routing=None` turns a routed variant's off.

Weights saved from the variant load strictly (a different `num_classes` re-initialises
only the head); weights of the base model load through `load_base_weights`; with no
weights named the base model's timm weights are used (shared blocks keep their run's
first block).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._features import FeatureGetterNet
from torch import nn

from vitblocks.io import CheckpointError, read_checkpoint
from vitblocks.models.plug import load_base_weights, make_recursive
from vitblocks.models.recursion_plan import RecursionPlan
from vitblocks.models.routed_weights import with_routers

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
    # Mixture-of-Recursions' layout: 4 unique blocks applied in turn 3 times; each use after the first
    # updates the tokens its router picks, 2/3 of them on the second and 1/3 on the third
    "deit_tiny_mor_patch16_224": ("deit_tiny_patch16_224", dict(
        loops=3, share="cycle", routing={"mode": "expert", "capacity": "descending"})),
    # bViT's layout: one block applied 12 times
    "deit_tiny_one_block_patch16_224": ("deit_tiny_patch16_224", dict(loops=12, share="cycle")),
}
"""Registered recursive variants: name -> (base timm model, make_recursive arguments)."""


def _variant_cfg(base: str) -> dict[str, Any]:
    cfg = get_pretrained_cfg(base)
    keep = ("input_size", "crop_pct", "interpolation", "mean", "std", "first_conv", "classifier", "num_classes",
            "pool_size", "fixed_input_size")
    return {k: getattr(cfg, k) for k in keep}


default_cfgs = generate_default_cfgs({f"{name}.untrained": _variant_cfg(base) for name, (base, _) in VARIANTS.items()})


def _weights_named_by(cfg: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The state dict a pretrained cfg points at (a state dict, a file, or a local folder), if any."""
    if cfg.get("state_dict"):
        return dict(cfg["state_dict"])
    location = cfg.get("file")
    if not location:
        return None
    path = Path(location)
    if cfg.get("source") == "local-dir" or path.is_dir():
        found = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds no model.safetensors or pytorch_model.bin")
        path = found[0]
    return read_checkpoint(path)


def _load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], plan: RecursionPlan, variant: str) -> None:
    """Load weights saved from the variant itself, or from its base model, refusing what does not fit."""
    target = model.state_dict()
    if sum(k in target for k in state_dict) < sum(plan.new_path(k) in target for k in state_dict):
        try:
            load_base_weights(model, state_dict, plan)  # the base model's own weights
        except ValueError as error:
            raise CheckpointError(f"the base weights do not fit {variant}: {error}") from None
        return
    state_dict = with_routers(state_dict, model)  # a static variant's weights into a routed one
    classifier = model.pretrained_cfg.get("classifier") or "head"
    for suffix in ("weight", "bias"):  # another class count: the head starts afresh, as timm does
        key = f"{classifier}.{suffix}"
        if key in state_dict and key in target and state_dict[key].shape != target[key].shape:
            del state_dict[key]
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shapes that differ
        raise CheckpointError(f"the weights do not fit {variant}: {' '.join(str(error).split())[:400]}") from None
    missing = [k for k in missing if not k.startswith(classifier + ".")]
    if missing or unexpected:
        raise CheckpointError(
            f"the weights do not fit {variant}: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:3]}). Are they for another model or other model arguments?"
        )


def _rewrap_feature_getter(wrapper: FeatureGetterNet, out_indices: Any) -> FeatureGetterNet:
    """`features_only` of a ViT whose blocks were shared: pick the levels among the new blocks.

    timm wrapped the base model before recursion, with levels counted over its blocks;
    sharing leaves fewer blocks, so the last-n default (or the indices asked for) is
    applied again to the recursive model.
    """
    levels = len(getattr(wrapper.model, "blocks", wrapper.out_indices))
    # timm's default (the last 3) may be more than a stack shared into one sequence has: as many as there are
    requested = min(len(wrapper.out_indices), levels) if out_indices is None else out_indices
    return FeatureGetterNet(wrapper.model, out_indices=requested, output_fmt=wrapper.output_fmt.value,
                            norm=wrapper.norm)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    base, recursion = VARIANTS[variant]
    if kwargs.get("num_classes", 0) < 0:  # timm would build a headless model without a word
        raise ValueError(f"num_classes={kwargs['num_classes']}: give the number of classes, or 0 for no classifier")
    cfg = kwargs.pop("pretrained_cfg", None)
    cfg = dict(cfg) if isinstance(cfg, dict) else (cfg.to_dict() if hasattr(cfg, "to_dict") else {})
    cfg.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
    state_dict = _weights_named_by(cfg) if pretrained else None
    # without weights of its own the variant starts from the base model's timm weights, if asked
    if "routing" in kwargs:  # a model argument of the variant, not of the base model
        recursion = {**recursion, "routing": kwargs.pop("routing")}
    model = timm.create_model(base, pretrained=pretrained and state_dict is None, **kwargs)
    plan = make_recursive(model, **recursion)
    if isinstance(model, FeatureGetterNet):
        model = _rewrap_feature_getter(model, kwargs.get("out_indices"))
    own = get_pretrained_cfg(variant).to_dict()
    model.pretrained_cfg = model.default_cfg = {**own, "architecture": variant, "tag": own.get("tag") or "untrained",
                                                "hf_hub_id": None, "url": ""}
    if state_dict is not None:
        _load_weights(model, state_dict, plan, variant)
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


@register_model
def deit_tiny_mor_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """DeiT-Tiny in Mixture-of-Recursions' layout: 4 unique blocks applied in turn 3 times, the second and
    third uses updating only 2/3 and 1/3 of the tokens (expert-choice routing, class token pinned)."""
    return _create("deit_tiny_mor_patch16_224", pretrained, **kwargs)


@register_model
def deit_tiny_one_block_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """DeiT-Tiny in bViT's layout: one block applied 12 times (add `routing=` for adaptive depth)."""
    return _create("deit_tiny_one_block_patch16_224", pretrained, **kwargs)
