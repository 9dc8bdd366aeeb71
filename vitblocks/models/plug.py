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
    plan = make_recursive(model, loops=2, mix="per_loop", groups=(4, 2))
    report = load_base_weights(model, base_state_dict, plan)

Each family of blocks is handled by an adapter in `vitblocks.models.families`; the
registered variants (`deit_tiny_rec_patch16_224`, ...) are in `plugged_variants`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from vitblocks.layers import NonLinearMix, Recursive
from vitblocks.layers.mix import mix_for_mode
from vitblocks.layers.modes import MixMode
from vitblocks.layers.schedule import GroupSchedule
from vitblocks.models.families import family_of
from vitblocks.models.recursion_plan import RecursionPlan, plan_runs


def block_stacks(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """The `blocks` stacks of a timm model (ViT: one; PiT and Swin: one per stage).

    Args:
        model: A timm model, or a feature wrapper around one.

    Returns:
        (module path, stack) pairs, in model order.
    """
    return [(name, module) for name, module in model.named_modules()
            if name.split(".")[-1] == "blocks" and isinstance(module, nn.Sequential)]


def make_recursive(
    model: nn.Module,
    loops: int = 2,
    share: bool = False,
    mix: MixMode | str = MixMode.NONE,
    mix_mlp_ratio: float = 1.0,
    groups: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
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
            attention (see `GroupSchedule.per_stage`).
        **attn_options: Further `SlicedGroupAttention` options (permutation policies,
            seed, backend).

    Returns:
        Where each original block went; pass it to `load_base_weights`.

    Raises:
        ValueError: For bad arguments, a model without `blocks` stacks, a family no
            adapter handles, slicing asked of Swin (its windows already restrict
            attention), or odd Swin stages.
    """
    if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
        raise ValueError(f"loops must be an int >= 1, got {loops!r}")
    mix = MixMode.parse(mix, "mix")
    stacks = block_stacks(model)
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no nn.Sequential 'blocks' stacks to make recursive")
    try:
        schedules = [None] * len(stacks) if groups is None else GroupSchedule.per_stage(groups, len(stacks))
    except ValueError as error:
        raise ValueError(str(error).replace("stages", "block stacks")) from None
    families = [family_of(list(stack), name) for name, stack in stacks]
    for (name, stack), family, schedule in zip(stacks, families, schedules):  # check all before rewriting any
        family.check_stack(name, list(stack), schedule)
    plan = RecursionPlan()
    for (name, stack), family, schedule in zip(stacks, families, schedules):
        prefix = family.prefix_tokens(model)
        blocks = [family.prepare(b, schedule, prefix, attn_options) for b in stack]
        size = family.unit_size
        units = [blocks[i : i + size] for i in range(0, len(blocks), size)]
        runs = plan_runs(len(units), loops, share)
        plan.add_stack(name, runs, size)
        mix_factory = partial(NonLinearMix, family.embed_dim(blocks[0]), mix_mlp_ratio)
        recursive = [
            Recursive(units[run[0]][0] if size == 1 else nn.Sequential(*units[run[0]]),
                      loops=len(run) if share else loops, mix=mix_for_mode(mix, mix_factory))
            for run in runs
        ]
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.split(".")[-1], nn.Sequential(*recursive))
        _renumber_feature_info(parent, name.split(".")[-1], len(recursive))
    return plan


def _renumber_feature_info(model: nn.Module, stack: str, num_blocks: int) -> None:
    """Give a stack whose blocks are feature levels (ViT) one level per recursive block.

    timm's ViT lists every block in `feature_info`; after sharing, the stack holds fewer
    blocks, and `forward_intermediates` / `features_only` index them by that list.

    Args:
        model: The module holding the stack (the ViT itself, also inside a timm feature
            wrapper).
        stack: The stack's attribute name on `model`.
        num_blocks: Blocks the stack holds now.
    """
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list):
        return
    levels = [i for i, entry in enumerate(info) if str(entry.get("module", "")).startswith(stack + ".")]
    if not levels or len(levels) == num_blocks:
        return
    template = info[levels[-1]]
    renumbered = [{**template, "module": f"{stack}.{j}"} for j in range(num_blocks)]
    info[levels[0] : levels[-1] + 1] = renumbered


def recursion_plan_of(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> RecursionPlan:
    """Recover the plan of a model rewritten by `make_recursive`, given its base's weights.

    Each stack's block count comes from the base weights and each recursive block's loop
    count from the model, which together tell shared runs from deepened blocks.

    Args:
        model: The rewritten model.
        state_dict: Weights of the base model.

    Returns:
        The plan `make_recursive` returned when it rewrote the model.

    Raises:
        ValueError: If a stack does not hold `Recursive` blocks.
    """
    plan = RecursionPlan()
    for name, stack in block_stacks(model):
        recursive = list(stack)
        if not all(isinstance(r, Recursive) for r in recursive):
            raise ValueError(f"{name} was not made recursive; call make_recursive first")
        size = len(recursive[0].block) if isinstance(recursive[0].block, nn.Sequential) else 1
        indices = {int(k[len(name) + 1 :].split(".")[0]) for k in state_dict if k.startswith(name + ".")}
        num_units = (max(indices) + 1) // size if indices else len(recursive)
        shared = num_units > len(recursive)
        runs = plan_runs(num_units, recursive[0].loops, share=True) if shared else plan_runs(num_units, 1, False)
        plan.add_stack(name, runs, size)
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


def load_base_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], plan: RecursionPlan | None = None
) -> LoadReport:
    """Load weights of the base timm model into its recursive form.

    Shared blocks take the weights of the first block of their run; blocks that a shared
    block replaced are reported as unused; mix layers are reported as new.

    Args:
        model: A model rewritten by `make_recursive` (or a registered variant).
        state_dict: Weights of the original timm model.
        plan: What `make_recursive` returned; None recovers it from the model and the
            base weights (`recursion_plan_of`).

    Returns:
        The report.

    Raises:
        ValueError: If a tensor's shape does not fit.
    """
    plan = plan or recursion_plan_of(model, state_dict)
    target = model.state_dict()
    converted, unused = {}, []
    for key, tensor in state_dict.items():
        new_key = plan.new_path(key)
        if new_key is None or new_key not in target:
            unused.append(key)
            continue
        if target[new_key].shape != tensor.shape:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}; the model's {new_key} is {tuple(target[new_key].shape)}")
        converted[new_key] = tensor
    model.load_state_dict(converted, strict=False)
    return LoadReport(sorted(converted), sorted(set(target) - set(converted)), sorted(unused))
