"""Recursive: apply one module's weights several times in a row."""

from __future__ import annotations

from torch import nn

from vitblocks.layers.loop import check_loop_count
from vitblocks.layers.modes import CheckpointSetting
from vitblocks.layers.schedule import GroupSchedule
from vitblocks.layers.shared_stack import MixSpec, SharedStack, check_block


class Recursive(SharedStack):
    """Weight-shared recursion: `loops` applications of one block, each optionally mixed.

    Loop `i` computes `x = mix_i(block(x, loop=i))`. The block is stored once, so the
    wrapper has exactly the block's parameters plus those of its mix layers, and it
    saves with `torch.save` and safetensors (no tensor is stored twice). Loop-aware
    blocks (their class sets `loop_aware = True`, as `TransformerBlock` does) are told
    the loop index; any other module is called as `block(x)`. It is the `SharedStack`
    whose assignment is one block repeated.

    Args:
        block: The module to apply repeatedly; maps a tensor to one of the same shape.
        loops: Number of applications, >= 1.
        mix: What follows each application: a factory (a class or a zero-argument
            callable such as `lambda: NonLinearMix(192)`) called once per loop for
            unshared layers, as in the paper; a module, shared by every loop; or None.
        grad_checkpointing: Activation checkpointing in training. True (or "loop"):
            each loop is recomputed in the backward pass, so only its input is kept —
            memory grows by one token tensor per loop instead of a block's worth of
            activations. "sqrt": loops are also grouped into about sqrt(loops) segments
            that are checkpointed as a whole (nested checkpointing), so memory grows
            with sqrt(loops) at the cost of one more forward pass; for very deep
            recursion.
        check_groups: Refuse a block whose group schedule names more loops than `loops`
            (its extra counts would never be used). Pass False where one stage-wide
            schedule serves blocks of several loop counts, as SReT's stages do.

    Raises:
        ValueError: If `loops` is not an int >= 1, `grad_checkpointing` is unknown, or
            (with `check_groups`) a group schedule is longer than the loops.
        TypeError: If `block` or what `mix` gives is not an nn.Module, or the block's
            forward takes `loop` without its class declaring `loop_aware`.

    Examples:
        >>> import torch
        >>> from vitblocks import NonLinearMix, Recursive, TransformerBlock
        >>> stage = Recursive(TransformerBlock(dim=192, num_heads=3), loops=2,
        ...                   mix=lambda: NonLinearMix(192))
        >>> stage(torch.randn(2, 49, 192)).shape
        torch.Size([2, 49, 192])
    """

    def __init__(
        self,
        block: nn.Module,
        loops: int = 2,
        mix: MixSpec = None,
        grad_checkpointing: CheckpointSetting = False,
        check_groups: bool = True,
    ) -> None:
        check_block(block)
        check_loop_count(loops)
        if check_groups:
            check_schedules_fit(block, loops)
        super().__init__([block], (0,) * loops, mix, grad_checkpointing)

    def _store_block(self, index: int, block: nn.Module) -> None:
        self.block = block

    def unique_blocks(self) -> list[nn.Module]:
        """The repeated block, as a one-element list.

        Returns:
            `[self.block]`.
        """
        return [self.block]

    @property
    def loops(self) -> int:
        """Applications of the block."""
        return len(self.assignment)

    def replace_block(self, block: nn.Module) -> None:
        """Swap the repeated block (e.g. for a `RelaxedBlock` around it), keeping loops and mix layers.

        Args:
            block: The new block.

        Raises:
            TypeError: If `block` is not an nn.Module.
        """
        self.set_unique_block(0, block)

    def _describe_positions(self) -> tuple[str, str]:
        return f"loops={self.loops}", "per-loop"


def check_schedules_fit(block: nn.Module, loops: int) -> None:
    """Refuse a block whose group schedule names more loops than it will run.

    A schedule shorter than the loops repeats its last entry (the documented rule); a
    longer one would silently never use its extra entries.

    Args:
        block: The block to repeat.
        loops: Its applications.

    Raises:
        ValueError: Naming the layer, its schedule and the two ways to make them agree.
    """
    for name, module in block.named_modules():
        schedule = getattr(module, "schedule", None)
        if isinstance(schedule, GroupSchedule) and len(schedule.counts) > loops:
            counts = schedule.counts
            raise ValueError(f"{name or 'the block'} has groups={counts}, one count per loop for {len(counts)} "
                             f"loops, but Recursive runs {loops}: give groups={counts[:loops]} or loops={len(counts)}")
