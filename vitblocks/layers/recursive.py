"""Recursive: apply one module's weights several times in a row."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitblocks.layers.loop import accepts_loop, accepts_mask, call_with_loop, check_loop_count, mask_kwargs
from vitblocks.layers.modes import CheckpointMode, CheckpointSetting, parse_checkpointing

MixSpec = nn.Module | Callable[[], nn.Module] | None


def _block_then_mix(block: nn.Module, mix: nn.Module | None, x: torch.Tensor, loop_kwargs: dict) -> torch.Tensor:
    """One application and its mix layer: the region `Recursive.compile_block` compiles.

    Blocks and mix layers arrive as arguments, so one compiled graph serves every loop,
    every per-loop mix layer and every structurally identical block.
    """
    x = block(x, **loop_kwargs)
    return x if mix is None else mix(x)


def loop_call_kwargs(block: nn.Module, x: torch.Tensor, loop: int, plans: bool, takes_loop: bool) -> dict[str, Any]:
    """What a block is told about one loop: its precomputed loop plan, the loop index, or nothing.

    Args:
        block: The block.
        x: Its input.
        loop: The loop index.
        plans: Whether the block has `loop_plan`.
        takes_loop: Whether its forward takes `loop`.

    Returns:
        Keyword arguments for the call.
    """
    if plans:
        plan = block.loop_plan(x, loop)
        if plan is not None:
            return {"plan": plan}
    return {"loop": loop} if takes_loop else {}


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
    layers = [mix() for _ in range(count)]
    for layer in layers:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"the mix factory must return nn.Module instances, got {type(layer).__name__}")
    return nn.ModuleList(layers), False


class Recursive(nn.Module):
    """Weight-shared recursion: `loops` applications of one block, each optionally mixed.

    Loop `i` computes `x = mix_i(block(x, loop=i))`. The block is stored once, so the
    wrapper has exactly the block's parameters plus those of its mix layers, and it
    saves with `torch.save` and safetensors (no tensor is stored twice). Blocks whose
    `forward` takes a `loop` argument are told the loop index; any other module is
    called as `block(x)`.

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

    Raises:
        ValueError: If `loops` is not an int >= 1 or `grad_checkpointing` is unknown.
        TypeError: If `block` or what `mix` gives is not an nn.Module.

    Example:
        >>> import torch
        >>> from vitblocks import NonLinearMix, Recursive, TransformerBlock
        >>> stage = Recursive(TransformerBlock(dim=192, num_heads=3), loops=2,
        ...                   mix=lambda: NonLinearMix(192))
        >>> stage(torch.randn(2, 49, 192)).shape
        torch.Size([2, 49, 192])
    """

    # fixed at construction; TorchScript compiles only the calls they select
    __constants__ = ["loops", "_block_takes_loop", "_block_takes_mask", "_mix_per_loop"]

    def __init__(
        self,
        block: nn.Module,
        loops: int = 2,
        mix: MixSpec = None,
        grad_checkpointing: CheckpointSetting = False,
    ) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
        check_loop_count(loops)
        self.block = block  # registered before the mix layers: parameter order is checkpoint and optimizer order
        self.loops = loops
        self.set_grad_checkpointing(grad_checkpointing)
        self.mix: nn.Module | None
        self.mix, self.shared_mix = mix_layers(mix, loops)
        self._read_block()
        self._mix_per_loop = not self.shared_mix
        self._compiled: Callable[..., torch.Tensor] | None = None

    def replace_block(self, block: nn.Module) -> None:
        """Swap the repeated block (e.g. for a `RelaxedBlock` around it), keeping loops and mix layers.

        Args:
            block: The new block.

        Raises:
            TypeError: If `block` is not an nn.Module.
        """
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
        self.block = block
        self._read_block()

    def _read_block(self) -> None:
        """Record how the block is called (loop index, mask, precomputed loop plans)."""
        self._block_takes_loop = accepts_loop(self.block)
        self._block_takes_mask = accepts_mask(self.block)
        self._block_plans = callable(getattr(self.block, "loop_plan", None))
        self._block_draws_masks = callable(getattr(self.block, "draw_drop_masks", None))

    def compile_block(self, **compile_kwargs: Any) -> None:
        """Regional compilation: compile one application of the block (and its mix layer).

        `torch.compile` of the whole model unrolls the loop and traces every application,
        so its compile time grows with `loops`. Here the compiled region is one
        application, with what differs between loops (the loop's group count and token
        permutations, from the block's `loop_plan`) passed in as inputs: every loop with
        the same group count reuses one compiled graph, and so does every block of the
        same shape. Blocks without `loop_plan` get the loop index, which `torch.compile`
        treats as a constant or, after it changes, a dynamic integer.

        Args:
            **compile_kwargs: Passed to `torch.compile` (e.g. `mode`, `backend`).
        """
        self._compiled = torch.compile(_block_then_mix, **compile_kwargs)

    @property
    def compiled(self) -> bool:
        """Whether `compile_block` was called."""
        return self._compiled is not None

    def _loop_kwargs(self, x: torch.Tensor, loop: int) -> dict[str, Any]:
        return loop_call_kwargs(self.block, x, loop, self._block_plans, self._block_takes_loop)

    def set_loops(self, loops: int) -> None:
        """Test-time depth: apply the block `loops` times from now on (more or fewer than trained).

        Loops beyond those trained reuse the last trained loop's per-loop parts: its mix
        layer, its group count and the last per-loop relaxation; fewer loops use the
        first ones. Weights are unchanged, so `set_loops(trained)` restores the model.

        Args:
            loops: Applications, >= 1.

        Raises:
            ValueError: If `loops` is not an int >= 1.
        """
        check_loop_count(loops)
        self.loops = loops

    def set_grad_checkpointing(self, enable: CheckpointSetting = True) -> None:
        """Set the activation checkpointing mode.

        Args:
            enable: False, True / "loop", or "sqrt" (see the class arguments).

        Raises:
            ValueError: For an unknown mode.
        """
        self._checkpoint_mode = parse_checkpointing(enable)
        self.grad_checkpointing = enable

    def mix_at(self, loop: int) -> nn.Module | None:
        """The mix layer that follows one application.

        Args:
            loop: Index of the application.

        Returns:
            The layer, or None when there is no mixing.
        """
        if self.mix is None or self.shared_mix:
            return self.mix
        return self.mix[min(loop, len(self.mix) - 1)]  # test-time depth: later loops reuse the last

    def _apply_once(self, x: torch.Tensor, loop: int, masks: torch.Tensor | None = None,
                    **block_kwargs: Any) -> torch.Tensor:
        if masks is not None:  # every loop's stochastic-depth masks, drawn at once
            block_kwargs = {**block_kwargs, "drop_masks": masks[loop]}
        if self._compiled is not None and not torch.compiler.is_compiling():
            return self._compiled(self.block, self.mix_at(loop), x, {**self._loop_kwargs(x, loop), **block_kwargs})
        if block_kwargs:
            x = self.block(x, **({"loop": loop} if self._block_takes_loop else {}), **block_kwargs)
        else:
            x = call_with_loop(self.block, x, loop, self._block_takes_loop)
        mix = self.mix_at(loop)
        return x if mix is None else mix(x)

    def _apply_checkpointed(self, x: torch.Tensor, start: int, stop: int, masks: torch.Tensor | None = None,
                            **block_kwargs: Any) -> torch.Tensor:
        for loop in range(start, stop):
            x = checkpoint(self._apply_once, x, loop, masks, use_reentrant=False, **block_kwargs)
        return x

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Apply the block `loops` times.

        Args:
            x: Input of the block's expected shape.
            attn_mask: timm's attention mask (passed by timm's ViT `forward_features`),
                given to every application; only for blocks that take one.
            is_causal: timm's causal-attention flag, likewise.

        Returns:
            The output of the last application (and its mix layer).

        Raises:
            TypeError: If a mask or causal attention is asked of a block without them.
        """
        if torch.jit.is_scripting():
            return self._forward_scripted(x, attn_mask, is_causal)
        return self._forward_eager(x, attn_mask, is_causal)

    def _forward_eager(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        block_kwargs = mask_kwargs(attn_mask, is_causal, self._block_takes_mask, type(self.block).__name__)
        mode = self._checkpoint_mode if self.training and torch.is_grad_enabled() else None
        # drawn outside any checkpoint: a recomputed loop reuses its masks instead of replaying the generator
        masks = self.block.draw_drop_masks(x, self.loops) if self._block_draws_masks else None
        if mode is None:
            for loop in range(self.loops):
                x = self._apply_once(x, loop, masks, **block_kwargs)
        elif mode is CheckpointMode.LOOP or self.loops < 4:
            x = self._apply_checkpointed(x, 0, self.loops, masks, **block_kwargs)
        else:
            segment = math.isqrt(self.loops - 1) + 1  # ceil(sqrt(loops))
            for start in range(0, self.loops, segment):
                stop = min(start + segment, self.loops)
                x = checkpoint(self._apply_checkpointed, x, start, stop, masks, use_reentrant=False, **block_kwargs)
        return x

    def _forward_scripted(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """`forward` as TorchScript compiles it (no checkpointing: scripted models infer)."""
        if self._mix_per_loop:
            trained = len(self.mix)
            loop = 0
            for mix in self.mix:
                if loop < self.loops:
                    x = mix(self._block_scripted(x, loop, attn_mask, is_causal))
                loop += 1
            for extra in range(trained, self.loops):  # test-time depth: reuse the last mix layer
                index = 0
                for last in self.mix:
                    if index == trained - 1:
                        x = last(self._block_scripted(x, extra, attn_mask, is_causal))
                    index += 1
        else:
            for loop in range(self.loops):
                x = self._block_scripted(x, loop, attn_mask, is_causal)
                if self.mix is not None:
                    x = self.mix(x)
        return x

    def _block_scripted(self, x: torch.Tensor, loop: int, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        if self._block_takes_mask:
            if self._block_takes_loop:
                return self.block(x, loop, attn_mask=attn_mask, is_causal=is_causal)
            return self.block(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise RuntimeError("Recursive: this block takes no attn_mask or is_causal")
        if self._block_takes_loop:
            return self.block(x, loop)
        return self.block(x)

    def extra_repr(self) -> str:
        mix = "none" if self.mix is None else ("shared" if self.shared_mix else "per-loop")
        return f"loops={self.loops}, mix={mix}, grad_checkpointing={self.grad_checkpointing}"
