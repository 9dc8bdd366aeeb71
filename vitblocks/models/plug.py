"""Recursion, sliced attention and non-linear mixing inside timm's DeiT/ViT, PiT and Swin.

`make_recursive` rewrites every `blocks` stack of a timm model in place:

- `share=False` ("deepen"): each block is applied `loops` times — same parameters,
  `loops` times the depth (the paper's naive recursion);
- `share=True` / `"consecutive"`: each run of `loops` consecutive blocks becomes the
  run's first block applied `loops` times — about 1/`loops` of the block parameters,
  same depth; `"cycle"` or an explicit assignment share blocks in any other order
  (see `vitblocks.layers.sharing`);
- `relax={"rank": 8}` gives each use of a shared block its own low-rank correction
  (`RelaxedBlock`);
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

from vitblocks.layers import NonLinearMix, Recursive, RelaxedBlock, SharedSequence, relax_recursion
from vitblocks.layers.loop import check_loop_count
from vitblocks.layers.mix import mix_for_mode
from vitblocks.layers.modes import MixMode
from vitblocks.layers.relaxation import Relaxation
from vitblocks.layers.routing import (
    TokenRouting,
    check_routed_groups,
    check_routing_options,
    routing_capacities,
)
from vitblocks.layers.schedule import GroupSchedule
from vitblocks.layers.shared_sequence import shared_layers
from vitblocks.layers.sharing import Sharing, runs_of, sharing_assignment
from vitblocks.models.families import family_of
from vitblocks.models.recursion_plan import RecursionPlan


def block_stacks(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """The `blocks` stacks of a timm model (ViT: one; PiT and Swin: one per stage).

    Args:
        model: A timm model, or a feature wrapper around one.

    Returns:
        (module path, stack) pairs, in model order.
    """
    return [(name, module) for name, module in model.named_modules()
            if name.split(".")[-1] == "blocks" and isinstance(module, nn.Sequential)]


def _stack_schedules(share: bool | Sharing | Sequence[Sequence[int]], stacks: list[tuple[str, nn.Sequential]]) -> list:
    """One sharing setting per stack: False (deepen), a schedule name, or an assignment."""
    if share is False or share is True:
        return ["consecutive" if share else False] * len(stacks)
    if isinstance(share, str):
        return [share] * len(stacks)
    if not isinstance(share, Sequence) or not share:
        raise ValueError(f"share must be False, True, 'consecutive', 'cycle' or an assignment, got {share!r}")
    if all(isinstance(entry, Sequence) and not isinstance(entry, str) for entry in share):
        if len(share) != len(stacks):
            raise ValueError(f"share gives {len(share)} assignments but the model has {len(stacks)} block stacks "
                             f"({', '.join(name for name, _ in stacks)}); give one per stack")
        return list(share)
    if len(stacks) > 1:
        raise ValueError(f"share: the model has {len(stacks)} block stacks ({', '.join(name for name, _ in stacks)}); "
                         "give one assignment per stack")
    return [share]


def make_recursive(
    model: nn.Module,
    loops: int = 2,
    share: bool | Sharing | Sequence[Sequence[int]] = False,
    mix: MixMode | str = MixMode.NONE,
    mix_mlp_ratio: float = 1.0,
    groups: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
    relax: Relaxation | dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    **attn_options: Any,
) -> RecursionPlan:
    """Rewrite a timm DeiT/ViT, PiT or Swin model into its recursive form, in place.

    Args:
        model: The timm model (or a timm feature wrapper around one).
        loops: Applications of each kept block (Swin: of each block pair); for the
            named schedules, the uses of each unique block.
        share: Which blocks share weights. False: none — every block loops (same
            parameters, deeper). True or "consecutive": runs of `loops` neighbouring
            blocks share the first one's weights (SReT; a short last run loops fewer
            times). "cycle": ceil(depth / loops) unique blocks applied in turn, `loops`
            times over. An explicit assignment: for each block position the index of the
            unique block it uses, e.g. `(0, 1, 0, 1, 2, 2)`; one per stack for PiT and
            Swin (units are Swin's block pairs). Consecutive runs become `Recursive`
            blocks; any other schedule becomes one `SharedSequence` per stack.
        mix: "none", "per_loop" (a NonLinearMix after every application) or "shared"
            (one per recursive block, reused by its loops).
        mix_mlp_ratio: NonLinearMix hidden width ratio.
        groups: Per-loop group schedule for sliced attention (ViT and PiT blocks only):
            one schedule such as `(4, 2)` for every stack, a list with one schedule per
            stack (PiT's three stages: `((8, 2), (4, 1), (1, 1))`), or None to keep full
            attention (see `GroupSchedule.per_stage`).
        relax: Relaxed recursion of every shared block: a `Relaxation` or a dict of
            its options (`rank`, `targets`, `norms`, `biases`, `layer_scale`), e.g.
            `{"rank": 8}`; None for plain sharing.
        routing: Token routing of every shared block (`TokenRouting`): a dict of its
            options, `{"capacity": 0.5}` (one number routes every use after the first;
            a sequence gives one per use). Prefix tokens are pinned. None: every token
            takes every loop. ViT/DeiT and PiT only; not with `relax`.
        **attn_options: Further `SlicedGroupAttention` options (permutation policies,
            seed, backend).

    Returns:
        Where each original block went; pass it to `load_base_weights`.

    Raises:
        ValueError: For bad arguments (including a bad assignment: wrong length, an
            index out of range, an unused unique block), a model without `blocks`
            stacks, a family no adapter handles, slicing asked of Swin (its windows
            already restrict attention), odd Swin stages, or routing asked of Swin, with
            `relax`, or with options `TokenRouting` does not take.
    """
    check_loop_count(loops)
    _check_routing(routing, relax)
    mix = MixMode.parse(mix, "mix")
    relaxation = None if relax is None else Relaxation.parse(relax)
    stacks = block_stacks(model)
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no nn.Sequential 'blocks' stacks to make recursive")
    try:
        schedules = [None] * len(stacks) if groups is None else GroupSchedule.per_stage(groups, len(stacks))
    except ValueError as error:
        raise ValueError(str(error).replace("stages", "block stacks")) from None
    families = [family_of(list(stack), name) for name, stack in stacks]
    assignments = []
    for (name, stack), family, schedule, setting in zip(stacks, families, schedules, _stack_schedules(share, stacks)):
        family.check_stack(name, list(stack), schedule)  # check all before rewriting any
        if routing is not None and not family.routes:
            raise ValueError(f"routing: {family.name} blocks ({name}) attend within windows that need every token; "
                             "token routing applies to ViT/DeiT and PiT blocks")
        units = len(stack) // family.unit_size
        where = f"{name} ({units} {'block pairs' if family.unit_size > 1 else 'blocks'})"
        assignments.append(None if setting is False else sharing_assignment(setting, units, loops, where=where))
        if routing is not None:  # refused here, before any stack is rewritten
            setting = assignments[-1]
            for uses in {loops} if setting is None else set(map(setting.count, set(setting))):
                capacities = routing_capacities(routing.get("capacity"), uses, routing.get("mode", "expert"))
                try:
                    if schedule is not None:
                        check_routed_groups(capacities, schedule, "its group schedule")
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from None
        if relaxation is not None:
            relaxation.check(stack[0])
    plan = RecursionPlan()
    for (name, stack), family, schedule, assignment in zip(stacks, families, schedules, assignments):
        prefix = family.prefix_tokens(model)
        blocks = [family.prepare(b, schedule, prefix, attn_options) for b in stack]
        size = family.unit_size
        units = [blocks[i] if size == 1 else nn.Sequential(*blocks[i : i + size]) for i in range(0, len(blocks), size)]
        dim = family.embed_dim(blocks[0])
        mix_spec = partial(mix_for_mode, mix, partial(NonLinearMix, dim, mix_mlp_ratio))
        route = partial(_routed, routing, dim, prefix)
        if assignment is None:  # deepen: every unit loops
            layers = [Recursive(route(unit, loops), loops=loops, mix=mix_spec()) for unit in units]
        else:  # each unique unit keeps the weights of the first position that uses it
            layers = shared_layers(
                assignment, lambda u, a=assignment, units=units, route=route: route(units[a.index(u)], a.count(u)),
                mix_spec)
        if relaxation is not None:
            relax_recursion(nn.Sequential(*layers), relaxation)
        assignment = tuple(range(len(units))) if assignment is None else assignment
        plan.add_stack(name, assignment, size, sequence=isinstance(layers[0], SharedSequence),
                       relaxed=_relaxed_units(layers, assignment), routed=_units_wrapped_in(TokenRouting, layers,
                                                                                            assignment))
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.split(".")[-1], nn.Sequential(*layers))
        _renumber_feature_info(parent, name.split(".")[-1], len(layers))
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
    count from the model, which together tell shared runs from deepened blocks; a
    `SharedSequence` carries its assignment.

    Args:
        model: The rewritten model.
        state_dict: Weights of the base model.

    Returns:
        The plan `make_recursive` returned when it rewrote the model.

    Raises:
        ValueError: If a stack does not hold `Recursive` blocks or one `SharedSequence`.
    """
    plan = RecursionPlan()
    for name, stack in block_stacks(model):
        layers = list(stack)
        if len(layers) == 1 and isinstance(layers[0], SharedSequence):
            sequence = layers[0]
            plan.add_stack(name, sequence.assignment, _unit_size(sequence.blocks[0]), sequence=True,
                           relaxed=_relaxed_units(layers, sequence.assignment),
                           routed=_units_wrapped_in(TokenRouting, layers, sequence.assignment))
            continue
        if not all(isinstance(r, Recursive) for r in layers):
            raise ValueError(f"{name} was not made recursive; call make_recursive first")
        size = _unit_size(layers[0].block)
        indices = {int(k[len(name) + 1 :].split(".")[0]) for k in state_dict if k.startswith(name + ".")}
        num_units = (max(indices) + 1) // size if indices else len(layers)
        if num_units > len(layers):  # shared runs: run r covers its Recursive's loops
            assignment = tuple(r for r, layer in enumerate(layers) for _ in range(layer.loops))
        else:
            assignment = tuple(range(num_units))
        plan.add_stack(name, assignment, size, relaxed=_relaxed_units(layers, assignment),
                       routed=_units_wrapped_in(TokenRouting, layers, assignment))
    return plan


def _unit_size(unit: nn.Module) -> int:
    unit = unit.shared if isinstance(unit, RelaxedBlock) else unit.block if isinstance(unit, TokenRouting) else unit
    return len(unit) if isinstance(unit, nn.Sequential) else 1


def _relaxed_units(layers: list[nn.Module], assignment: Sequence[int]) -> set[int]:
    """Unique-unit indices (as the assignment numbers them) whose block is a `RelaxedBlock`.

    Args:
        layers: A `Recursive` per run of the assignment, or one `SharedSequence`.
        assignment: The stack's assignment.

    Returns:
        The indices.
    """
    return _units_wrapped_in(RelaxedBlock, layers, assignment)


def _units_wrapped_in(wrapper: type[nn.Module], layers: list[nn.Module], assignment: Sequence[int]) -> set[int]:
    """Unique-unit indices (as the assignment numbers them) whose block is a `wrapper`.

    Args:
        wrapper: `RelaxedBlock` or `TokenRouting`.
        layers: A `Recursive` per run of the assignment, or one `SharedSequence`.
        assignment: The stack's assignment.

    Returns:
        The indices.
    """
    if len(layers) == 1 and isinstance(layers[0], SharedSequence):
        return {u for u, block in enumerate(layers[0].blocks) if isinstance(block, wrapper)}
    return {assignment[run[0]] for run, layer in zip(runs_of(assignment), layers) if isinstance(layer.block, wrapper)}


def _check_routing(routing: dict[str, Any] | None, relax: Any) -> None:
    check_routing_options(routing)
    if routing is not None and relax is not None:
        raise ValueError("routing and relax together are not supported yet: a relaxed block's per-loop parameters "
                         "and a router's choice of tokens would both have to follow each use; choose one")


def _routed(routing: dict[str, Any] | None, dim: int, prefix: int, unit: nn.Module, uses: int) -> nn.Module:
    """A unit wrapped in `TokenRouting` for its `uses` applications, or the unit itself without routing."""
    if routing is None:
        return unit
    reference = next(unit.parameters(), None)  # routers where the block's weights are, in their dtype
    where = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    return TokenRouting(unit, dim, loops=uses, pinned=prefix, **routing, **where)


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
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}; "
                             f"the model's {new_key} is {tuple(target[new_key].shape)}")
        converted[new_key] = tensor
    model.load_state_dict(converted, strict=False)
    return LoadReport(sorted(converted), sorted(set(target) - set(converted)), sorted(unused))
