"""Relaxed recursion: each loop of a shared block gets its own small correction.

Bae et al., "Relaxed Recursive Transformers" (ICLR 2025): a block shared across loops
keeps one set of weights, and each loop adds its own low-rank (LoRA) update to the
chosen linears, so sharing costs little accuracy for few parameters. MiniViT keeps the
LayerNorms unshared per layer; here that is `norms=True`.

Every relaxed parameter is *shared value + per-loop delta*, and every delta starts at
zero, so relaxing a block does not change what it computes until the deltas train (or
a conversion sets them; see `vitblocks.models.convert`). The shared weights keep their
names (`attn.qkv.weight`), so weights of the unrelaxed block load unchanged. What is
relaxed is one `Relaxation` (`layers/relaxation.py`); the per-loop modules are in
`layers/per_loop.py`.

    block = RelaxedBlock(TransformerBlock(dim=192, num_heads=3), loops=2, rank=8)
    stage = Recursive(block, loops=2)
    relax_recursion(model, rank=8)       # every Recursive / SharedSequence of a model
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vitblocks.layers.loop import check_loop_count, is_loop_aware, loop_inputs, mask_kwargs
from vitblocks.layers.per_loop import PER_LOOP_MODULES
from vitblocks.layers.relaxation import Relaxation
from vitblocks.layers.scripting import NotScriptable
from vitblocks.layers.shared_stack import SharedStack


class RelaxedBlock(NotScriptable, nn.Module):
    """A shared block whose chosen linears (and optionally norms, LayerScale) vary per loop.

    Wraps any block given to `Recursive` or `SharedSequence`: the wrapper takes the loop
    index, selects that loop's corrections inside the block, and calls the block (passing
    the loop on when the block is loop-aware). The block's own parameters keep their
    names under `shared.`; the per-loop ones are added beside them (`lora_down`,
    `lora_up`, `bias_delta`, `weight_delta`, `gamma_delta`).

    With `rank=0` and no other option nothing inside the block changes (the wrapper
    computes exactly what the block does). Loops beyond `loops` (test-time depth) reuse
    the last loop's corrections.

    Args:
        block: The shared block; relaxed in place.
        loops: Loops with their own corrections (the block's uses).
        relaxation: What varies per loop: a `Relaxation` or a dict of its options.
        **options: The `Relaxation` options instead (`rank`, `targets`, `norms`,
            `biases`, `layer_scale`), e.g. `rank=8`.

    Raises:
        ValueError: If the block is already relaxed, for an unknown option, a rank that
            is negative or above a targeted linear's full rank, or a relaxation that
            finds nothing to relax in the block.

    Examples:
        >>> import torch
        >>> from vitblocks.layers import Recursive, RelaxedBlock, TransformerBlock
        >>> stage = Recursive(RelaxedBlock(TransformerBlock(dim=64, num_heads=2), loops=2, rank=4), loops=2)
        >>> stage(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
    """

    loop_aware = True

    def __init__(self, block: nn.Module, loops: int, relaxation: Relaxation | Mapping[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__()
        if isinstance(block, RelaxedBlock):
            raise ValueError("this block is already relaxed")
        self.loops = check_loop_count(loops)
        self.relaxation = Relaxation.parse(relaxation, **options)
        for name, per_loop in self.relaxation.replacements(block):  # all checked before anything is replaced
            _replace(block, name, per_loop(loops))
        self.shared = block
        self._takes_loop = is_loop_aware(block)
        # found once, not on every application (a plain list: the modules are registered under `shared`)
        self._per_loop = [m for m in block.modules() if isinstance(m, PER_LOOP_MODULES)]

    def select_loop(self, loop: int) -> None:
        """Make every per-loop module of the block use one loop's corrections.

        Args:
            loop: The loop (later loops than trained use the last one's).
        """
        for module in self._per_loop:
            module.active_loop = loop

    def forward(
        self, x: torch.Tensor, loop: int = 0, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Apply the block with loop `loop`'s corrections.

        Args:
            x: The block's input.
            loop: Loop index.
            attn_mask: timm's attention mask, for blocks that take one.
            is_causal: timm's causal flag, likewise.

        Returns:
            The block's output.

        Raises:
            TypeError: If a mask is given to a block that takes none.
        """
        # Selecting the loop is a side effect; under torch.fx the wrapped call below is only
        # recorded (it reselects at run time, before layers that FX records as one call,
        # such as sliced attention), so the loop is also selected here for traced-through code.
        self.select_loop(loop)
        x = select_loop_of(self, x, loop)
        kwargs = mask_kwargs(attn_mask, is_causal, [self.shared])
        return self.shared(x, **loop_inputs(self.shared, x, loop, self._takes_loop, plans=False), **kwargs)

    def extra_repr(self) -> str:
        r = self.relaxation
        options = ", ".join(k for k in ("norms", "biases", "layer_scale") if getattr(r, k))
        return f"loops={self.loops}, rank={r.rank}, targets={r.targets}" + (f", {options}" if options else "")


def select_loop_of(block: RelaxedBlock, x: torch.Tensor, loop: int) -> torch.Tensor:
    """Select a relaxed block's loop and pass `x` through: one node of an FX graph, run in order.

    Args:
        block: The relaxed block.
        x: Its input, returned unchanged.
        loop: The loop to select.

    Returns:
        `x`.
    """
    block.select_loop(loop)
    return x


torch.fx.wrap("select_loop_of")


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root.get_submodule(path.rsplit(".", 1)[0]) if "." in path else root
    setattr(parent, path.rsplit(".", 1)[-1], module)


def relax_recursion(model: nn.Module, relaxation: Relaxation | Mapping[str, Any] | None = None,
                    **options: Any) -> int:
    """Relax every shared block of a model: wrap it in a `RelaxedBlock`, in place.

    Finds each shared stack (`Recursive`: its block gets `loops` corrections;
    `SharedSequence`: each unique block gets one per use) — SReT's stages,
    `make_recursive`'s stacks, or your own. Blocks used once (nothing shared) and blocks
    already relaxed are left as they are.

    Args:
        model: Any module holding `Recursive` or `SharedSequence` layers.
        relaxation: A `Relaxation` or a dict of its options.
        **options: The `Relaxation` options instead, e.g. `rank=8`.

    Returns:
        The number of blocks relaxed.

    Raises:
        ValueError: If the model has no shared block, or from `Relaxation` / `RelaxedBlock`.

    Examples:
        >>> import timm, vitblocks
        >>> from vitblocks.layers import relax_recursion
        >>> model = timm.create_model("sret_t", img_size=64)
        >>> relax_recursion(model, rank=4)
        10
    """
    relaxation = Relaxation.parse(relaxation, **options)
    stacks = [m for m in model.modules() if isinstance(m, SharedStack)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no Recursive or SharedSequence layer to relax; "
                         "share its blocks first (vitblocks.models.make_recursive)")
    relaxed = 0
    for stack in stacks:
        for index, (block, uses) in enumerate(zip(stack.unique_blocks(), stack.block_uses)):
            if uses > 1 and getattr(block, "applies_mix", False):
                raise ValueError(f"{type(block).__name__} routes its tokens (it applies the stack's mix layers to "
                                 "the tokens it updates): relaxing a routed block is not supported yet")
            if uses > 1 and not isinstance(block, RelaxedBlock):
                stack.set_unique_block(index, RelaxedBlock(block, uses, relaxation))
                relaxed += 1
    return relaxed
