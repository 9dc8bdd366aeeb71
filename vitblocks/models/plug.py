"""Recursion, sliced attention and non-linear mixing inside timm's DeiT/ViT, PiT and Swin.

`make_recursive` rewrites every `blocks` stack of a timm model in place:

- `share=False` ("deepen"): each block is applied `loops` times — same parameters,
  `loops` times the depth (the paper's naive recursion);
- `share=True`: each run of `loops` consecutive blocks becomes the run's first block
  applied `loops` times — about 1/`loops` of the block parameters, same depth;
- `mix="per_loop"` / `"shared"` adds NonLinearMix layers after the applications;
- `groups=(8, 2)` swaps each ViT block's attention for `SlicedGroupAttention` with the
  same weights; class and distillation tokens are prefix tokens that every group sees.

Swin blocks are recursed in (window, shifted-window) pairs, so every application of a
pair keeps the W-MSA / SW-MSA alternation and its masks.

    model = timm.create_model("deit_tiny_patch16_224")
    report = make_recursive(model, loops=2, mix="per_loop", groups=(4, 2))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block as VitBlock
from torch import nn

from vitblocks.layers import NonLinearMix, Recursive, SlicedGroupAttention
from vitblocks.layers.mix import mix_for_mode



class LoopAwareVitBlock(VitBlock):
    """timm's ViT block, told which loop it is on so sliced attention can follow its schedule.

    `make_recursive` switches a block's class to this one in place: parameter names and
    weights stay those of `timm.models.vision_transformer.Block`.
    """

    def forward(self, x: torch.Tensor, loop: int = 0, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """Apply the block; `loop` goes to a loop-aware attention layer."""
        if isinstance(self.attn, SlicedGroupAttention):
            attn = self.attn(self.norm1(x), loop=loop, attn_mask=attn_mask, is_causal=is_causal)
        else:
            attn = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(attn))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@dataclass
class RecursionPlan:
    """Where each original block went, for loading weights of the base model.

    Attributes:
        block_paths: Original block path (e.g. "blocks.3") -> its path in the rewritten
            model, or None when it was dropped because it shares an earlier block's weights.
    """

    block_paths: dict[str, str | None] = field(default_factory=dict)


def _block_stacks(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    return [(name, module) for name, module in model.named_modules()
            if name.split(".")[-1] == "blocks" and isinstance(module, nn.Sequential)]


def _prefix_tokens(model: nn.Module) -> int:
    if hasattr(model, "num_prefix_tokens"):
        return int(model.num_prefix_tokens)
    cls_token = getattr(model, "cls_token", None)
    return int(cls_token.shape[1]) if cls_token is not None else 0


def _sliced_attention(block: VitBlock, groups: Sequence[int], num_prefix_tokens: int, **options: Any) -> SlicedGroupAttention:
    old = block.attn
    dim = old.qkv.in_features
    sliced = SlicedGroupAttention(
        dim, old.num_heads, groups=groups, qkv_bias=old.qkv.bias is not None,
        qk_norm=not isinstance(old.q_norm, nn.Identity), scale_norm=not isinstance(getattr(old, "norm", nn.Identity()), nn.Identity),
        proj_bias=old.proj.bias is not None, attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p,
        num_prefix_tokens=num_prefix_tokens, **options,
    )
    sliced.load_state_dict(old.state_dict())
    return sliced.to(old.qkv.weight.device, old.qkv.weight.dtype)


def _dim(block: nn.Module) -> int:
    return block.norm1.normalized_shape[0]


def make_recursive(
    model: nn.Module,
    loops: int = 2,
    share: bool = False,
    mix: str = "none",
    mix_mlp_ratio: float = 1.0,
    groups: Sequence[int] | None = None,
    **attn_options: Any,
) -> RecursionPlan:
    """Rewrite a timm DeiT/ViT, PiT or Swin model into its recursive form, in place.

    Args:
        model: The timm model (or a timm feature wrapper around one).
        loops: Applications of each kept block (Swin: of each block pair).
        share: False: every block loops (same parameters, deeper). True: runs of `loops`
            consecutive blocks share the first one's weights (fewer parameters, same
            depth; a short last run loops fewer times).
        mix: "none", "per_loop" (a NonLinearMix after every application) or "shared"
            (one per recursive block, reused by its loops).
        mix_mlp_ratio: NonLinearMix hidden width ratio.
        groups: Per-loop group schedule for sliced attention (ViT and PiT blocks only):
            one schedule such as `(4, 2)` for every stack, a list with one schedule per
            stack (PiT's three stages: `((8, 2), (4, 1), (1, 1))`), or None to keep full
            attention.
        **attn_options: Further `SlicedGroupAttention` options (permutation policies,
            seed, backend).

    Returns:
        Where each original block went (see `load_base_weights`).

    Raises:
        ValueError: For bad arguments, a model without `blocks` stacks, slicing asked of
            Swin (its windows already restrict attention), or odd Swin stages.
    """
    if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
        raise ValueError(f"loops must be an int >= 1, got {loops!r}")
    mix_for_mode(mix, nn.Identity)  # validates the mode before any block is rewritten
    stacks = _block_stacks(model)
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no nn.Sequential 'blocks' stacks to make recursive")
    prefix = _prefix_tokens(model)
    plan = RecursionPlan()
    per_stack = groups is not None and all(isinstance(g, Sequence) for g in groups)
    if per_stack and len(groups) != len(stacks):
        raise ValueError(f"groups gives {len(groups)} schedules for {len(stacks)} block stacks")
    for index, (stack_name, stack) in enumerate(stacks):
        stack_groups = groups[index] if per_stack else groups
        blocks = list(stack)
        swin = hasattr(blocks[0], "shift_size")
        if swin and stack_groups is not None:
            raise ValueError("groups: Swin attention is already windowed; slicing applies to ViT/DeiT and PiT blocks")
        if swin and len(blocks) % 2:
            raise ValueError(f"{stack_name} has {len(blocks)} Swin blocks; recursion needs (W-MSA, SW-MSA) pairs")
        if not swin and not all(isinstance(b, VitBlock) for b in blocks):
            raise ValueError(f"{stack_name} holds {type(blocks[0]).__name__}; supported: timm ViT/PiT and Swin blocks")
        for block in blocks:
            if not swin:
                if stack_groups is not None:
                    block.attn = _sliced_attention(block, stack_groups, prefix, **attn_options)
                block.__class__ = LoopAwareVitBlock
        size = 2 if swin else 1
        units = [blocks[i : i + size] for i in range(0, len(blocks), size)]
        # each run is the units that one Recursive replaces; its first unit keeps its weights
        runs = [units[i : i + loops] for i in range(0, len(units), loops)] if share else [[u] for u in units]
        new_blocks = []
        for r, run in enumerate(runs):
            unit = run[0]
            mix_spec = mix_for_mode(mix, partial(NonLinearMix, _dim(unit[0]), mix_mlp_ratio))
            body = unit[0] if size == 1 else nn.Sequential(*unit)
            new_blocks.append(Recursive(body, loops=len(run) if share else loops, mix=mix_spec))
            for u, member in enumerate(run):
                for k, block in enumerate(member):
                    inner = f"{stack_name}.{r}.block" + (f".{k}" if size == 2 else "")
                    plan.block_paths[f"{stack_name}.{blocks.index(block)}"] = inner if u == 0 else None
        parent = model.get_submodule(stack_name.rsplit(".", 1)[0]) if "." in stack_name else model
        setattr(parent, stack_name.split(".")[-1], nn.Sequential(*new_blocks))
    model.recursion_plan = plan
    return plan


@dataclass
class LoadReport:
    """What `load_base_weights` did.

    Attributes:
        loaded: Model keys that took a tensor from the base weights.
        new: Model keys with no counterpart in the base (mix layers), left as initialised.
        unused: Base keys not loaded (blocks whose weights an earlier block's replace).
    """

    loaded: list[str]
    new: list[str]
    unused: list[str]

    def __str__(self) -> str:
        return (f"loaded {len(self.loaded)} tensors, {len(self.new)} new (e.g. {self.new[:2]}), "
                f"{len(self.unused)} unused base tensors (e.g. {self.unused[:2]})")


def load_base_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> LoadReport:
    """Load weights of the base timm model into its recursive form.

    Shared blocks take the weights of the first block of their run; blocks that a shared
    block replaced are reported as unused; mix layers are reported as new.

    Args:
        model: A model rewritten by `make_recursive`.
        state_dict: Weights of the original timm model.

    Returns:
        The report.

    Raises:
        ValueError: If a tensor's shape does not fit.
    """
    plan: RecursionPlan = model.recursion_plan
    paths = sorted(plan.block_paths.items(), key=lambda kv: -len(kv[0]))
    target = model.state_dict()
    converted, unused = {}, []
    for key, tensor in state_dict.items():
        new_key: str | None = key
        for original, moved in paths:
            if key.startswith(original + "."):
                new_key = None if moved is None else moved + key[len(original):]
                break
        if new_key is None or new_key not in target:
            unused.append(key)
            continue
        if target[new_key].shape != tensor.shape:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}; the model's {new_key} is {tuple(target[new_key].shape)}")
        converted[new_key] = tensor
    model.load_state_dict(converted, strict=False)
    return LoadReport(sorted(converted), sorted(set(target) - set(converted)), sorted(unused))


def _recursive_variant(variant: str, base: str, recursion: dict[str, Any], pretrained: bool, **kwargs: Any) -> nn.Module:
    """Build `base` with timm (pretrained weights included, if asked) and make it recursive."""
    import timm

    kwargs.pop("pretrained_cfg", None)  # the variant's cfg; the base resolves its own (overlays still apply)
    model = timm.create_model(base, pretrained=pretrained, **kwargs)
    make_recursive(model, **recursion)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    model.pretrained_cfg = {**cfg, "architecture": variant, "tag": "", "hf_hub_id": None, "url": ""}
    return model


def _variant_cfg(base: str) -> dict[str, Any]:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(base)
    keep = ("input_size", "crop_pct", "interpolation", "mean", "std", "first_conv", "classifier", "num_classes",
            "pool_size", "fixed_input_size")
    return {k: getattr(cfg, k) for k in keep}


def _register_variants() -> None:
    from timm.models import generate_default_cfgs, register_model

    variants = {
        # name: (base timm model, make_recursive arguments)
        "deit_tiny_rec_patch16_224": ("deit_tiny_patch16_224", dict(loops=2, mix="per_loop")),
        "deit_tiny_rec_sliced_patch16_224": ("deit_tiny_patch16_224", dict(loops=2, mix="per_loop", groups=(4, 2))),
        "deit_tiny_shared_patch16_224": ("deit_tiny_patch16_224", dict(loops=2, share=True, mix="per_loop")),
        "pit_ti_rec_224": ("pit_ti_224", dict(loops=2, mix="per_loop")),
        "pit_ti_rec_sliced_224": ("pit_ti_224", dict(loops=2, mix="per_loop", groups=((8, 2), (4, 1), (1, 1)))),
        "pit_ti_shared_224": ("pit_ti_224", dict(loops=2, share=True, mix="per_loop")),
        "swin_tiny_rec_patch4_window7_224": ("swin_tiny_patch4_window7_224", dict(loops=2, mix="per_loop")),
        "swin_tiny_shared_patch4_window7_224": ("swin_tiny_patch4_window7_224", dict(loops=2, share=True, mix="per_loop")),
    }
    import sys

    module = sys.modules[__name__]
    module.default_cfgs = generate_default_cfgs({f"{name}.untrained": _variant_cfg(base) for name, (base, _) in variants.items()})
    for name, (base, recursion) in variants.items():
        def factory(pretrained: bool = False, _name: str = name, _base: str = base, _rec: dict = recursion, **kwargs: Any):
            return _recursive_variant(_name, _base, _rec, pretrained, **kwargs)

        factory.__name__ = factory.__qualname__ = name
        factory.__module__ = __name__
        factory.__doc__ = (
            f"timm's {base} made recursive with {recursion}.\n\n"
            f"Args:\n    pretrained: Load {base}'s timm weights first (shared blocks keep their run's first block).\n"
            f"    **kwargs: Arguments for timm.create_model({base!r}, ...).\n\n"
            "Returns:\n    The recursive model."
        )
        setattr(module, name, register_model(factory))
        VARIANTS[name] = (base, recursion)


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {}
"""Registered recursive variants: name -> (base timm model, make_recursive arguments)."""

_register_variants()
