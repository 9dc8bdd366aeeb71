"""SharedStack: the core of every weight-shared stack of blocks.

A stack runs *positions* in order; position `p` applies unique block `assignment[p]`
and then its mix layer. The `n`-th use of a block is its loop `n`, which loop-aware
blocks are told (see `vitblocks.layers.loop`). `Recursive` is the stack of one block
used `loops` times in a row; `SharedSequence` takes any assignment. Checkpointing,
regional compilation, mix layers, test-time depth and loop selection live here once.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitblocks.layers.loop import check_loop_count, is_loop_aware, loop_inputs, mask_kwargs, run_block
from vitblocks.layers.modes import CheckpointMode, CheckpointSetting, parse_checkpointing
from vitblocks.layers.scripting import NotScriptable
from vitblocks.layers.sharing import cycle_period, loop_indices

MixSpec = nn.Module | Callable[[], nn.Module] | None


def mix_layers(mix: MixSpec, count: int) -> tuple[nn.Module | None, bool]:
    """What a `mix` argument builds: one layer per application, or one shared layer, or none.

    Args:
        mix: A factory (called `count` times for unshared layers), a module (shared) or None.
        count: Applications that get an unshared layer each.

    Returns:
        (an `nn.ModuleList` of `count` layers, a module or None; whether it is shared).

    Raises:
        TypeError: If `mix` is none of these or the factory returns something else than a module.
    """
    if mix is None or isinstance(mix, nn.Module):
        return mix, True
    if not callable(mix):
        raise TypeError(f"mix must be an nn.Module, a factory of them, or None; got {type(mix).__name__}")
    if isinstance(mix, type):
        try:
            inspect.signature(mix).bind()
        except TypeError as error:
            raise TypeError(f"mix={mix.__name__} is called with no arguments once per loop, but {error}: give a "
                            f"factory that supplies them, e.g. mix=lambda: {mix.__name__}(dim) or "
                            f"functools.partial({mix.__name__}, dim)") from None
    layers = [mix() for _ in range(count)]
    for layer in layers:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"the mix factory must return nn.Module instances, got {type(layer).__name__}")
    return nn.ModuleList(layers), False


def check_block(block: Any) -> nn.Module:
    """Refuse a block that is not a module.

    Args:
        block: The candidate.

    Returns:
        `block`.

    Raises:
        TypeError: Naming its type.
    """
    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
    return block


class SharedStack(NotScriptable, nn.Module):
    """Unique blocks applied in an assignment's order, each application optionally mixed.

    Subclasses store their blocks (`_store_block`, `unique_blocks`) and give the
    assignment; everything else is here. Use `Recursive` or `SharedSequence`.

    Args:
        blocks: The unique blocks.
        assignment: One unique-block index per position.
        mix: What follows each position: a factory (one unshared layer per position),
            a module (shared by every position) or None.
        grad_checkpointing: False, True / "loop" (each position is recomputed in the
            backward pass) or "sqrt" (positions are also grouped into about
            sqrt(positions) segments checkpointed as a whole).
    """

    def __init__(self, blocks: Sequence[nn.Module], assignment: Sequence[int], mix: MixSpec,
                 grad_checkpointing: CheckpointSetting) -> None:
        super().__init__()
        for index, block in enumerate(blocks):  # registered before the mix layers: that is checkpoint order
            self._store_block(index, check_block(block))
        self.assignment = tuple(assignment)
        self.set_grad_checkpointing(grad_checkpointing)
        self.mix: nn.Module | None
        self.mix, self.shared_mix = mix_layers(mix, len(self.assignment))
        self._read_blocks()
        self._compiled: Callable[..., torch.Tensor] | None = None

    def _store_block(self, index: int, block: nn.Module) -> None:
        raise NotImplementedError

    def unique_blocks(self) -> list[nn.Module]:
        """The unique blocks, in index order.

        Returns:
            The blocks.
        """
        raise NotImplementedError

    @property
    def assignment(self) -> tuple[int, ...]:
        """For each position, the index of the unique block it applies."""
        return self._assignment

    @assignment.setter
    def assignment(self, assignment: tuple[int, ...]) -> None:
        # what forward and mix_at read at every call, derived once per assignment (every block is used)
        self._assignment = assignment
        self._loop_of_position = loop_indices(assignment)
        self._block_uses = tuple(assignment.count(k) for k in range(max(assignment) + 1))
        self._cycle_period = cycle_period(assignment) or 1

    @property
    def block_uses(self) -> tuple[int, ...]:
        """How many positions apply each unique block."""
        return self._block_uses

    def set_unique_block(self, index: int, block: nn.Module) -> None:
        """Swap one unique block (e.g. for a `RelaxedBlock` around it), keeping the mix layers.

        Args:
            index: Which unique block.
            block: The new block.

        Raises:
            TypeError: If `block` is not an nn.Module.
        """
        self._store_block(index, check_block(block))
        self._read_blocks()

    def _read_blocks(self) -> None:
        """Record how each block is called (loop-aware, loop plans, stochastic-depth masks)."""
        blocks = self.unique_blocks()
        self._aware = [is_loop_aware(b) for b in blocks]
        self._plans = [callable(getattr(b, "loop_plan", None)) for b in blocks]
        self._draws_masks = [callable(getattr(b, "draw_drop_masks", None)) for b in blocks]

    def set_grad_checkpointing(self, enable: CheckpointSetting = True) -> None:
        """Set the activation checkpointing mode.

        Args:
            enable: False, True / "loop", or "sqrt" (see the class arguments).

        Raises:
            ValueError: For an unknown mode.
        """
        self._checkpoint_mode = parse_checkpointing(enable)
        self.grad_checkpointing = enable

    def compile_block(self, **compile_kwargs: Any) -> None:
        """Regional compilation: compile one application of a block (and its mix layer).

        `torch.compile` of the whole model unrolls the loop and traces every application,
        so its compile time grows with the loop count. Here the compiled region is one
        application (`vitblocks.layers.loop.run_block`), with what differs between loops
        (the loop's group count and token permutations, from the block's `loop_plan`)
        passed in as inputs: every loop with the same group count reuses one compiled
        graph, and so does every block of the same shape. Blocks without `loop_plan` get
        the loop index, which `torch.compile` treats as a constant or, after it changes,
        a dynamic integer.

        Args:
            **compile_kwargs: Passed to `torch.compile` (e.g. `mode`, `backend`).
        """
        self._compiled = torch.compile(run_block, **compile_kwargs)

    @property
    def compiled(self) -> bool:
        """Whether `compile_block` was called."""
        return self._compiled is not None

    def set_loops(self, loops: int) -> None:
        """Test-time depth: run the stack's cycle of blocks `loops` times from now on.

        Weights are unchanged, so setting the trained count restores the model.
        Positions beyond those trained reuse the last trained cycle's mix layers, and
        loop-aware blocks reuse their last trained loop's parts (group count, per-loop
        relaxation).

        Args:
            loops: Cycles (for one block: applications), >= 1.

        Raises:
            ValueError: If `loops` is not an int >= 1, or the assignment is not whole
                cycles (another schedule has no single notion of "one more loop").
        """
        check_loop_count(loops)
        period = cycle_period(self.assignment)
        if period is None:
            raise ValueError(f"set_loops needs a cycle schedule (0 1 ... K-1 repeated); this sequence's assignment is "
                             f"{self.assignment}: build it with the longer assignment you want instead")
        self.assignment = tuple(range(period)) * loops

    def mix_at(self, position: int) -> nn.Module | None:
        """The mix layer after one position.

        Positions beyond those trained (test-time depth) reuse the last trained cycle's
        layer of the same block.

        Args:
            position: The position (for one block: the loop).

        Returns:
            The layer, or None when there is no mixing.
        """
        if self.mix is None or self.shared_mix:
            return self.mix
        trained = len(self.mix)
        if position < trained:
            return self.mix[position]
        period = self._cycle_period
        return self.mix[trained - period + (position - trained) % period]

    @property
    def positions(self) -> int:
        """Applications of blocks in one forward pass (for one block: its loops)."""
        return len(self.assignment)

    def draw(self, x: torch.Tensor) -> list[Any]:
        """What each unique block draws once per forward pass (`draw_drop_masks`): stochastic-depth
        factors, token-choice depths. With `apply_position`, runs the stack a position at a time.

        Args:
            x: The stack's input.

        Returns:
            One entry per unique block (None where it draws nothing).
        """
        uses = self.block_uses
        return [b.draw_drop_masks(x, uses[i]) if self._draws_masks[i] else None
                for i, b in enumerate(self.unique_blocks())]

    def apply_position(self, x: torch.Tensor, position: int, draws: list[Any]) -> torch.Tensor:
        """One position of the stack (a block application and its mix layer), as `forward` runs it.

        Running every position in order on `draw(x)` gives `forward(x)` exactly; in between,
        the caller may look at the tokens (early exit) or keep only some images (then keep
        the same rows of `draws`).

        Args:
            x: The tokens after the previous position.
            position: Which position, from 0.
            draws: This forward pass's `draw`.

        Returns:
            The tokens after it.
        """
        return self._run_position(x, position, draws, {})

    def _run_position(self, x: torch.Tensor, position: int, masks: list[torch.Tensor | None],
                      block_kwargs: dict[str, Any]) -> torch.Tensor:
        index, loop = self.assignment[position], self._loop_of_position[position]
        block = self.unique_blocks()[index]
        compiled = self._compiled is not None and not torch.compiler.is_compiling()
        plans = compiled and self._plans[index]
        kwargs = {**loop_inputs(block, x, loop, self._aware[index], plans), **block_kwargs}
        if masks[index] is not None:
            kwargs["drop_masks"] = masks[index][loop]
        return (self._compiled if compiled else run_block)(block, self.mix_at(position), x, kwargs)

    def _apply_range(self, x: torch.Tensor, start: int, stop: int, masks: list[torch.Tensor | None],
                     block_kwargs: dict[str, Any], recompute: bool) -> torch.Tensor:
        for position in range(start, stop):
            if recompute:
                x = checkpoint(self._run_position, x, position, masks, block_kwargs, use_reentrant=False)
            else:
                x = self._run_position(x, position, masks, block_kwargs)
        return x

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Apply every position in order.

        Args:
            x: Input of the blocks' expected shape.
            attn_mask: timm's attention mask (passed by timm's ViT `forward_features`),
                given to every application; only for blocks that take one.
            is_causal: timm's causal-attention flag, likewise.

        Returns:
            The output of the last position (and its mix layer).

        Raises:
            TypeError: If a mask or causal attention is asked of a block without them.
        """
        blocks = self.unique_blocks()
        block_kwargs = mask_kwargs(attn_mask, is_causal, blocks)
        # drawn outside any checkpoint: a recomputed position reuses its masks instead of replaying the generator
        masks = self.draw(x)
        mode = self._checkpoint_mode if self.training and torch.is_grad_enabled() else None
        positions = len(self.assignment)
        if mode is None or mode is CheckpointMode.LOOP or positions < 4:
            return self._apply_range(x, 0, positions, masks, block_kwargs, recompute=mode is not None)
        segment = math.isqrt(positions - 1) + 1  # ceil(sqrt(positions))
        for start in range(0, positions, segment):
            stop = min(start + segment, positions)
            x = checkpoint(self._apply_range, x, start, stop, masks, block_kwargs, True, use_reentrant=False)
        return x

    def _describe_positions(self) -> tuple[str, str]:
        """How `extra_repr` names the positions, and an unshared mix layer."""
        return f"assignment={self.assignment}", "per-position"

    def extra_repr(self) -> str:
        positions, unshared = self._describe_positions()
        mix = "none" if self.mix is None else ("shared" if self.shared_mix else unshared)
        return f"{positions}, mix={mix}, grad_checkpointing={self.grad_checkpointing}"
