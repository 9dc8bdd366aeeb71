"""SharedSequence: a stack of layers whose weights follow any sharing schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from vitblocks.layers.modes import CheckpointSetting
from vitblocks.layers.recursive import Recursive
from vitblocks.layers.shared_stack import MixSpec, SharedStack, check_block
from vitblocks.layers.sharing import check_assignment, is_consecutive, runs_of


class SharedSequence(SharedStack):
    """Apply unique blocks in the order an assignment gives, e.g. cycled: A B C A B C.

    Position `p` runs `blocks[assignment[p]]`; the `n`-th use of a block is its loop `n`
    (loop-aware blocks are told it, so per-loop group counts and relaxations follow
    each block's own uses). `Recursive` is the stack of one block used `loops` times
    in a row; this covers cycles (ALBERT, Universal Transformers) and any explicit map.
    Every block is stored once.

    Args:
        blocks: The unique blocks; each maps a tensor to one of the same shape.
        assignment: For each position, the index of its block (see
            `vitblocks.layers.sharing`); every block must be used.
        mix: What follows each position: a factory (one unshared layer per position),
            a module (shared by every position) or None.
        grad_checkpointing: False, True / "loop" (each position is recomputed in the
            backward pass) or "sqrt" (segments of about sqrt(positions) positions are
            also checkpointed as a whole).

    Raises:
        ValueError: For an invalid assignment.
        TypeError: If a block or what `mix` gives is not an nn.Module.

    Examples:
        >>> import torch
        >>> from vitblocks.layers import SharedSequence, TransformerBlock
        >>> blocks = [TransformerBlock(dim=64, num_heads=2) for _ in range(3)]
        >>> stack = SharedSequence(blocks, assignment=(0, 1, 2, 0, 1, 2))
        >>> stack(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        assignment: Sequence[int],
        mix: MixSpec = None,
        grad_checkpointing: CheckpointSetting = False,
    ) -> None:
        blocks = [check_block(block) for block in blocks]
        assignment = check_assignment(assignment, len(assignment), "the sequence")
        if max(assignment) + 1 != len(blocks):
            raise ValueError(f"the assignment {assignment} uses {max(assignment) + 1} unique blocks but "
                             f"{len(blocks)} were given")
        super().__init__(blocks, assignment, mix, grad_checkpointing)

    def _store_block(self, index: int, block: nn.Module) -> None:
        if "blocks" not in self._modules:
            self.blocks = nn.ModuleList()
        if index == len(self.blocks):
            self.blocks.append(block)
        else:
            self.blocks[index] = block

    def unique_blocks(self) -> list[nn.Module]:
        """The unique blocks, in index order.

        Returns:
            The blocks of `self.blocks`.
        """
        return list(self.blocks)

    @property
    def loops(self) -> tuple[int, ...]:
        """Uses of each unique block."""
        return self.block_uses

    replace_block = SharedStack.set_unique_block  # (index, block): the name Recursive.replace_block(block) has


def shared_layers(
    assignment: Sequence[int], unique_block: Callable[[int], nn.Module], mix: Callable[[], MixSpec] = lambda: None
) -> list[SharedStack]:
    """The layers that run an assignment: a `Recursive` per run, or one `SharedSequence`.

    When every unique block's uses are neighbours (SReT's consecutive sharing), each run
    becomes a `Recursive`; any other schedule becomes one `SharedSequence`.

    Args:
        assignment: One unique-block index per position (see `vitblocks.layers.sharing`).
        unique_block: Builds (or returns) unique block `u`; called once per block, in
            the order the layers hold them.
        mix: Called once per layer for its `mix` argument (e.g. `mix_for_mode`), so a
            "shared" mix layer is one per layer.

    Returns:
        The layers, in order.
    """
    if is_consecutive(assignment):
        # a stage-wide group schedule serves runs of every length here
        return [Recursive(unique_block(assignment[run[0]]), loops=len(run), mix=mix(), check_groups=False)
                for run in runs_of(assignment)]
    return [SharedSequence([unique_block(u) for u in range(max(assignment) + 1)], assignment, mix=mix())]
