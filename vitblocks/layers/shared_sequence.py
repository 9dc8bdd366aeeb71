"""SharedSequence: a stack of layers whose weights follow any sharing schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitblocks.layers.loop import accepts_loop, accepts_mask, check_loop_count, mask_kwargs
from vitblocks.layers.modes import CheckpointSetting, parse_checkpointing
from vitblocks.layers.recursive import MixSpec, Recursive, _block_then_mix, loop_call_kwargs, mix_layers
from vitblocks.layers.sharing import check_assignment, cycle_period, is_consecutive, loop_indices, runs_of


class SharedSequence(nn.Module):
    """Apply unique blocks in the order an assignment gives, e.g. cycled: A B C A B C.

    Position `p` runs `blocks[assignment[p]]`; the `n`-th use of a block is its loop `n`
    (loop-aware blocks are told it, so per-loop group counts and relaxations follow
    each block's own uses). `Recursive` is the special case of one block used `loops`
    times in a row; this covers cycles (ALBERT, Universal Transformers) and any
    explicit map. Every block is stored once.

    Args:
        blocks: The unique blocks; each maps a tensor to one of the same shape.
        assignment: For each position, the index of its block (see
            `vitblocks.layers.sharing`); every block must be used.
        mix: What follows each position: a factory (one unshared layer per position),
            a module (shared by every position) or None.
        grad_checkpointing: Recompute each position in the backward pass (True or
            "loop"; "sqrt" is treated as "loop").

    Raises:
        ValueError: For an invalid assignment.
        TypeError: If a block or what `mix` gives is not an nn.Module.

    Example:
        >>> import torch
        >>> from vitblocks.layers import SharedSequence, TransformerBlock
        >>> blocks = [TransformerBlock(dim=64, num_heads=2) for _ in range(3)]
        >>> stack = SharedSequence(blocks, assignment=(0, 1, 2, 0, 1, 2))
        >>> stack(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
    """

    __jit_unused_properties__ = ["loops", "compiled"]

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        assignment: Sequence[int],
        mix: MixSpec = None,
        grad_checkpointing: CheckpointSetting = False,
    ) -> None:
        super().__init__()
        for block in blocks:
            if not isinstance(block, nn.Module):
                raise TypeError(f"blocks must be nn.Modules, got {type(block).__name__}")
        assignment = check_assignment(assignment, len(assignment), "the sequence")
        if max(assignment) + 1 != len(blocks):
            raise ValueError(f"the assignment {assignment} uses {max(assignment) + 1} unique blocks but "
                             f"{len(blocks)} were given")
        self.blocks = nn.ModuleList(blocks)
        self.assignment = assignment
        self.set_grad_checkpointing(grad_checkpointing)
        self.mix: nn.Module | None
        self.mix, self.shared_mix = mix_layers(mix, len(assignment))
        self._read_blocks()
        self._compiled: Callable[..., torch.Tensor] | None = None

    def _read_blocks(self) -> None:
        self._takes_loop = [accepts_loop(b) for b in self.blocks]
        self._takes_mask = [accepts_mask(b) for b in self.blocks]
        self._plans = [callable(getattr(b, "loop_plan", None)) for b in self.blocks]

    def replace_block(self, index: int, block: nn.Module) -> None:
        """Swap one unique block (e.g. for a `RelaxedBlock` around it).

        Args:
            index: Which unique block.
            block: The new block.

        Raises:
            TypeError: If `block` is not an nn.Module.
        """
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
        self.blocks[index] = block
        self._read_blocks()

    @property
    def loops(self) -> tuple[int, ...]:
        """Uses of each unique block."""
        return tuple(self.assignment.count(k) for k in range(len(self.blocks)))

    def set_grad_checkpointing(self, enable: CheckpointSetting = True) -> None:
        """Set activation checkpointing.

        Args:
            enable: False, True / "loop" or "sqrt" (both recompute each position).

        Raises:
            ValueError: For an unknown mode.
        """
        self._checkpointing = parse_checkpointing(enable) is not None
        self.grad_checkpointing = enable

    def compile_block(self, **compile_kwargs: Any) -> None:
        """Regional compilation: compile one application (block and mix) once for every position.

        Args:
            **compile_kwargs: Passed to `torch.compile`.
        """
        self._compiled = torch.compile(_block_then_mix, **compile_kwargs)

    @property
    def compiled(self) -> bool:
        """Whether `compile_block` was called."""
        return self._compiled is not None

    def set_loops(self, loops: int) -> None:
        """Test-time depth for a cycle schedule: run the cycle of blocks `loops` times.

        Per-position mix layers beyond the trained positions reuse the last one; loop-aware
        blocks reuse their last trained loop's parts (see `Recursive.set_loops`).

        Args:
            loops: Cycles, >= 1.

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
            position: The position.

        Returns:
            The layer, or None when there is no mixing.
        """
        if self.mix is None or self.shared_mix:
            return self.mix
        trained = len(self.mix)
        if position < trained:
            return self.mix[position]
        period = cycle_period(self.assignment) or 1
        return self.mix[trained - period + (position - trained) % period]

    def _apply_position(self, x: torch.Tensor, position: int, loop: int, block_kwargs: dict[str, Any]) -> torch.Tensor:
        index = self.assignment[position]
        block = self.blocks[index]
        loop_kwargs = loop_call_kwargs(block, x, loop, self._plans[index], self._takes_loop[index])
        if self._compiled is not None and not torch.compiler.is_compiling():
            return self._compiled(block, self.mix_at(position), x, {**loop_kwargs, **block_kwargs})
        return _block_then_mix(block, self.mix_at(position), x, {**loop_kwargs, **block_kwargs})

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Apply every position in order.

        Args:
            x: Input of the blocks' expected shape.
            attn_mask: timm's attention mask, given to every block (blocks must take it).
            is_causal: timm's causal-attention flag, likewise.

        Returns:
            The output of the last position (and its mix layer).

        Raises:
            TypeError: If a mask or causal attention is asked of blocks without them.
            RuntimeError: Under TorchScript.
        """
        if torch.jit.is_scripting():
            raise RuntimeError("SharedSequence cannot run in TorchScript (it picks blocks by position); export the "
                               "model with torch.export, torch.jit.trace or ONNX instead")
        block_kwargs = mask_kwargs(attn_mask, is_causal, all(self._takes_mask), "a block of this SharedSequence")
        recompute = self._checkpointing and self.training and torch.is_grad_enabled()
        for position, loop in enumerate(loop_indices(self.assignment)):
            if recompute:
                x = checkpoint(self._apply_position, x, position, loop, block_kwargs, use_reentrant=False)
            else:
                x = self._apply_position(x, position, loop, block_kwargs)
        return x

    def extra_repr(self) -> str:
        mix = "none" if self.mix is None else ("shared" if self.shared_mix else "per-position")
        return f"assignment={self.assignment}, mix={mix}, grad_checkpointing={self.grad_checkpointing}"


def shared_layers(
    assignment: Sequence[int], unique_block: Callable[[int], nn.Module], mix: Callable[[], MixSpec] = lambda: None
) -> list[nn.Module]:
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
        return [Recursive(unique_block(assignment[run[0]]), loops=len(run), mix=mix()) for run in runs_of(assignment)]
    return [SharedSequence([unique_block(u) for u in range(max(assignment) + 1)], assignment, mix=mix())]

