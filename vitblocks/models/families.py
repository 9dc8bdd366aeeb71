"""How `make_recursive` handles each timm model family: one small adapter per family.

An adapter says how to recognise the family's blocks, what the unit of recursion is,
how many prefix tokens the model has, how to swap in sliced attention, and how to make
a block loop-aware. `make_recursive` finds the adapter whose `matches` accepts a stack's
blocks; adding a family is one subclass and one `register_family` call (see
docs/architecture.md, "Add a timm family").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from timm.models.vision_transformer import Block as VitBlock
from torch import nn

from vitblocks.layers import SlicedGroupAttention
from vitblocks.layers.loop import mask_kwargs
from vitblocks.layers.loop_plan import LoopPlan
from vitblocks.layers.schedule import GroupSchedule
from vitblocks.layers.scripting import NotScriptable

_LOOP_VIEW_CLASSES: dict[type, type] = {}


def loop_view_class(block_class: type) -> type:
    """The class of a wrapped block's per-call views: a subclass of the block's class.

    A view holds only the wrapper and the call's bound attention; every other attribute
    falls through to the wrapper, so the view sees its parts, parameters and training
    flag as they are at the call. One class per block class, made when a block is
    wrapped or unpickled, outside any trace (`torch.compile` traces creating an
    instance, but in torch 2.11 not copying a module's `__dict__`, which split the graph
    at every block application).

    What a block's `forward` may do to `self` is what reading allows: it reads its parts
    and attributes, calls `super()` and checks `isinstance`; assigning a module or
    buffer to `self` inside `forward` is not supported, and `type(self)` is this
    subclass, named `<Block>LoopView`.

    Args:
        block_class: The wrapped block's class.

    Returns:
        The view class, made once and kept.
    """
    view_class = _LOOP_VIEW_CLASSES.get(block_class)
    if view_class is None:

        def __init__(self: Any, wrapper: nn.Module, attn: Any) -> None:
            object.__setattr__(self, "_loop_wrapper", wrapper)  # no nn.Module.__init__: the parts are the wrapper's
            object.__setattr__(self, "_loop_attn", attn)

        def __getattr__(self: Any, name: str) -> Any:
            if name.startswith("_loop_"):
                raise AttributeError(name)
            if name == "attn":
                return self._loop_attn
            return getattr(self._loop_wrapper, name)

        name = f"{block_class.__name__}LoopView"
        view_class = type(name, (block_class,), {"__init__": __init__, "__getattr__": __getattr__,
                                                  "__module__": __name__, "__qualname__": name})
        _LOOP_VIEW_CLASSES[block_class] = view_class
    return view_class


def _loop_view(wrapper: LoopAwareBlock, attn: Any) -> nn.Module:
    """One call's view of a wrapped block: an instance of (a subclass of) the block's own
    class that shares the wrapper's parts, with the attention bound to the call's loop.

    Being an instance of that class, its `forward` may call `super()` or check
    `isinstance(self, ...)`; being a fresh object per call, nothing about the loop is
    stored on any module.
    """
    return loop_view_class(wrapper.block_class)(wrapper, attn)


class LoopAwareBlock(NotScriptable, nn.Module):
    """A timm block that takes the loop index, running the block's own `forward`.

    It holds the block's parts under their own names, so parameter names and weights are
    those of the block (the base model's checkpoints load unchanged), and runs the block
    class's `forward` on a per-call view (an instance of that class sharing these parts)
    whose attention is bound to the loop: no `forward` is copied, no loop state is kept
    between calls, and a subclass's `forward` may call `super().forward`.

    Args:
        block: The timm block (e.g. `timm.models.vision_transformer.Block`); its parts
            move into this module.
    """

    loop_aware = True

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block_class = type(block)
        loop_view_class(self.block_class)  # made here, outside any trace
        self._sliced = isinstance(getattr(block, "attn", None), SlicedGroupAttention)
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in block.named_buffers(recurse=False):
            self.register_buffer(name, buffer)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        loop_view_class(self.block_class)  # an unpickled model in a new process: made here, not while tracing

    def loop_plan(self, x: torch.Tensor, loop: int) -> Any:
        """The sliced attention's plan for one loop (see `SlicedGroupAttention.loop_plan`).

        Args:
            x: The block's input tokens (B, P + N, C).
            loop: Loop index.

        Returns:
            The plan, or None when the attention is not sliced.
        """
        if not self._sliced:
            return None
        return self.attn.loop_plan(x.shape[1] - self.attn.num_prefix_tokens, loop, x.device)

    def forward(
        self,
        x: torch.Tensor,
        loop: int = 0,
        plan: LoopPlan | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Apply the block; sliced attention follows the loop (or its precomputed plan).

        Args:
            x: Tokens.
            loop: Loop index.
            plan: The loop's plan from `loop_plan`, if computed beforehand.
            attn_mask: timm's attention mask, passed on when set.
            is_causal: timm's causal flag, passed on when set.

        Returns:
            The block's output.

        Raises:
            TypeError: If a mask is given and the wrapped block's `forward` takes none.
        """
        kwargs = mask_kwargs(attn_mask, is_causal, [self.block_class.forward])
        attn = functools.partial(self.attn, loop=loop, plan=plan) if self._sliced else self.attn
        return self.block_class.forward(_loop_view(self, attn), x, **kwargs)

    def extra_repr(self) -> str:
        return f"wraps={self.block_class.__name__}"


class FamilyAdapter:
    """What `make_recursive` needs to know about one family of timm blocks.

    Attributes:
        name: The family, for messages.
        unit_size: Blocks applied together as one unit of recursion.
        slices: Whether `groups` (sliced attention) applies to the family.
        routes: Whether token routing (`make_recursive(routing=...)`) applies: a family
            whose blocks need every token (Swin's windows) says no.
    """

    name: str = ""
    unit_size: int = 1
    slices: bool = True
    routes: bool = True

    def matches(self, block: nn.Module) -> bool:
        """Whether a block belongs to this family.

        Args:
            block: The first block of a stack.

        Returns:
            True if this adapter handles the stack.
        """
        raise NotImplementedError

    def prefix_tokens(self, model: nn.Module) -> int:
        """Tokens in front of the patch tokens (class, distillation) that every group sees.

        Args:
            model: The whole model.

        Returns:
            The count.
        """
        if hasattr(model, "num_prefix_tokens"):
            return int(model.num_prefix_tokens)
        cls_token = getattr(model, "cls_token", None)
        return int(cls_token.shape[1]) if cls_token is not None else 0

    def check_stack(self, stack: str, blocks: Sequence[nn.Module], groups: GroupSchedule | None) -> None:
        """Refuse a stack this family cannot recurse as asked.

        Args:
            stack: The stack's module path.
            blocks: Its blocks.
            groups: The requested group schedule, or None.

        Raises:
            ValueError: Saying what is wrong.
        """
        if groups is not None and not self.slices:
            raise ValueError(f"groups: {self.name} attention cannot be sliced here")
        if len(blocks) % self.unit_size:
            raise ValueError(f"{stack} has {len(blocks)} {self.name} blocks; recursion needs units of {self.unit_size}")

    def prepare(self, block: nn.Module, groups: GroupSchedule | None, num_prefix_tokens: int,
                attn_options: dict[str, Any]) -> nn.Module:
        """Swap in sliced attention (when `groups` is set) and make the block loop-aware.

        Args:
            block: One block, rewritten in place or replaced.
            groups: The group schedule, or None to keep full attention.
            num_prefix_tokens: From `prefix_tokens`.
            attn_options: Further `SlicedGroupAttention` options.

        Returns:
            The block to use.
        """
        return block

    def embed_dim(self, block: nn.Module) -> int:
        """Token channels of a block (the width of its NonLinearMix layers).

        Args:
            block: One block.

        Returns:
            The channels.
        """
        return block.norm1.normalized_shape[0]


def sliced_copy_of(
    attn: nn.Module, groups: GroupSchedule, num_prefix_tokens: int, **options: Any
) -> SlicedGroupAttention:
    """A `SlicedGroupAttention` with the options and weights of a `timm.layers.Attention`.

    Args:
        attn: timm's attention layer.
        groups: The group schedule.
        num_prefix_tokens: Prefix tokens every group sees.
        **options: Further `SlicedGroupAttention` options.

    Returns:
        The sliced layer, on the same device and dtype.
    """
    sliced = SlicedGroupAttention(
        attn.qkv.in_features, attn.num_heads, groups=groups, qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        scale_norm=not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity),
        proj_bias=attn.proj.bias is not None, attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
        num_prefix_tokens=num_prefix_tokens, device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype, **options,
    )
    sliced.load_state_dict(attn.state_dict())
    return sliced


class VitFamily(FamilyAdapter):
    """timm's ViT / DeiT blocks (`vision_transformer.Block`); PiT's stages use the same block.

    Sliced attention replaces the block's attention (same weights), and the block is
    wrapped in `LoopAwareBlock` so `Recursive` can tell it the loop.
    """

    name = "ViT"

    def matches(self, block):
        return isinstance(block, VitBlock)

    def prepare(self, block, groups, num_prefix_tokens, attn_options):
        if groups is not None:
            block.attn = sliced_copy_of(block.attn, groups, num_prefix_tokens, **attn_options)
        return LoopAwareBlock(block)


class SwinFamily(FamilyAdapter):
    """timm's Swin blocks, recursed in (W-MSA, SW-MSA) pairs so every application keeps the
    shifted-window alternation and its masks."""

    name, unit_size, slices, routes = "Swin", 2, False, False

    def matches(self, block):
        return hasattr(block, "shift_size") and hasattr(block, "window_size")

    def check_stack(self, stack, blocks, groups):
        if groups is not None:
            raise ValueError("groups: Swin attention is already windowed; slicing applies to ViT/DeiT and PiT blocks")
        super().check_stack(stack, blocks, groups)


FAMILIES: list[FamilyAdapter] = []
"""Registered adapters; the first whose `matches` accepts a stack's first block handles it."""


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make `make_recursive` handle another family of blocks.

    Args:
        adapter: The adapter; tried before those registered earlier.

    Returns:
        `adapter`.
    """
    FAMILIES.insert(0, adapter)
    return adapter


def family_of(blocks: Sequence[nn.Module], stack: str) -> FamilyAdapter:
    """The adapter for a stack of blocks.

    Args:
        blocks: The stack's blocks.
        stack: Its module path, for the error.

    Returns:
        The first registered adapter that matches every block.

    Raises:
        ValueError: If none does, naming the supported families.
    """
    for adapter in FAMILIES:
        if all(adapter.matches(b) for b in blocks):
            return adapter
    supported = ", ".join(a.name for a in FAMILIES)
    raise ValueError(f"{stack} holds {type(blocks[0]).__name__}; supported: timm {supported} blocks "
                     "(add a family with vitblocks.models.families.register_family)")


register_family(VitFamily())
register_family(SwinFamily())
