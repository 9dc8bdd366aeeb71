"""The loop protocol: how a shared stack tells a block which application it is on.

A block is *loop-aware* when its class sets `loop_aware = True`; its `forward` then
takes a `loop` keyword (the index of this application of its weights) and, if the
block has `loop_plan(x, loop)`, a `plan` keyword instead (what differs on that loop,
computed ahead, so that one compiled graph serves every loop). Any other module is
called as `module(x)`. `run_block` is the one place a block is called for a loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def is_loop_aware(module: nn.Module) -> bool:
    """Whether a module wants the loop index: its `loop_aware` attribute.

    Args:
        module: Any module.

    Returns:
        `module.loop_aware`, False when the class does not declare it.

    Raises:
        TypeError: If `forward` takes a `loop` argument but the class does not declare
            `loop_aware`, which would silently call it without the index.
    """
    declared = getattr(module, "loop_aware", None)
    if declared is not None:
        return bool(declared)
    if "loop" in _forward_parameters(module):
        raise TypeError(f"{type(module).__name__}.forward takes a `loop` argument but the class does not declare "
                        "`loop_aware`: set the class attribute `loop_aware = True` to be told each application's "
                        "loop index (or False to be called as module(x))")
    return False


def accepts_mask(taker: nn.Module | Callable[..., Any]) -> bool:
    """Whether a module (or a forward function) takes timm's `attn_mask` and `is_causal` arguments.

    Only asked when a mask is given, to refuse it clearly for blocks without one.

    Args:
        taker: Any module (its `forward` is asked) or a function.

    Returns:
        True if its parameters include both `attn_mask` and `is_causal`.
    """
    parameters = _forward_parameters(taker)
    return "attn_mask" in parameters and "is_causal" in parameters


def _forward_parameters(taker: nn.Module | Callable[..., Any]) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(taker.forward if isinstance(taker, nn.Module) else taker).parameters)
    except (TypeError, ValueError):  # builtins and some C-implemented modules have no signature
        return ()


def loop_inputs(block: nn.Module, x: torch.Tensor, loop: int, aware: bool, plans: bool) -> dict[str, Any]:
    """What a block is told about one loop: its precomputed loop plan, the loop index, or nothing.

    Args:
        block: The block.
        x: Its input.
        loop: The loop index.
        aware: Whether the block is loop-aware (`is_loop_aware`).
        plans: Whether to hand it `block.loop_plan(x, loop)` (for compiled regions,
            which take what differs between loops as inputs).

    Returns:
        Keyword arguments for the call.
    """
    if not aware:
        return {}
    if plans:
        plan = block.loop_plan(x, loop)
        if plan is not None:
            return {"plan": plan}
    return {"loop": loop}


def run_block(block: nn.Module, mix: nn.Module | None, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One application of a block and the mix layer after it.

    This is also the region `SharedStack.compile_block` compiles: blocks and mix layers
    arrive as arguments, so one compiled graph serves every loop, every per-loop mix
    layer and every structurally identical block.

    Args:
        block: The block.
        mix: Its mix layer, or None.
        x: The input.
        kwargs: The loop's inputs (`loop_inputs`), masks and drop masks.

    Returns:
        `mix(block(x, **kwargs))`; a block that declares `applies_mix = True` (token routing,
        which mixes only the tokens it updated) is handed the mix layer instead:
        `block(x, mix=mix, **kwargs)`.
    """
    if getattr(block, "applies_mix", False):
        return block(x, mix=mix, **kwargs)
    x = block(x, **kwargs)
    return x if mix is None else mix(x)


def check_loop_count(loops: int) -> int:
    """Refuse a loop count that is not an int >= 1.

    Args:
        loops: The count.

    Returns:
        `loops`.

    Raises:
        ValueError: Naming the value.
    """
    if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
        raise ValueError(f"loops must be an int >= 1, got {loops!r}")
    return loops


def mask_kwargs(attn_mask: torch.Tensor | None, is_causal: bool,
                takers: Sequence[nn.Module | Callable[..., Any]]) -> dict[str, Any]:
    """timm's mask arguments to pass on: none when unset.

    Args:
        attn_mask: timm's attention mask, or None.
        is_causal: timm's causal flag.
        takers: The blocks (or forward functions) that will get them.

    Returns:
        `{}` when neither is set, else both as keyword arguments.

    Raises:
        TypeError: If one is set and a taker has no such arguments, naming its class
            (or the function's qualified name).
    """
    if attn_mask is None and not is_causal:
        return {}
    refusing = sorted({_name_of(taker) for taker in takers if not accepts_mask(taker)})
    if refusing:
        raise TypeError(f"{', '.join(refusing)} takes no attn_mask or is_causal")
    return {"attn_mask": attn_mask, "is_causal": is_causal}


def _name_of(taker: nn.Module | Callable[..., Any]) -> str:
    return type(taker).__name__ if isinstance(taker, nn.Module) else getattr(taker, "__qualname__", repr(taker))
