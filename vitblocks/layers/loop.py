"""Calling modules that may or may not take a loop index."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def accepts_loop(module: nn.Module) -> bool:
    """Whether a module is loop-aware.

    Args:
        module: Any module.

    Returns:
        True if `module.forward` has a parameter named `loop`.
    """
    try:
        return "loop" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # builtins and some C-implemented modules have no signature
        return False


def accepts_mask(module: nn.Module) -> bool:
    """Whether a module takes timm's `attn_mask` and `is_causal` forward arguments.

    Args:
        module: Any module.

    Returns:
        True if `module.forward` has parameters named `attn_mask` and `is_causal`.
    """
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attn_mask" in parameters and "is_causal" in parameters


def call_with_loop(module: nn.Module, x: torch.Tensor, loop: int, takes_loop: bool) -> torch.Tensor:
    """Call a module, passing the loop index only to loop-aware modules.

    Args:
        module: The module.
        x: Its input.
        loop: The loop index.
        takes_loop: Whether the module is loop-aware (see `accepts_loop`).

    Returns:
        `module(x, loop=loop)` or `module(x)`.
    """
    return module(x, loop=loop) if takes_loop else module(x)


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


def mask_kwargs(attn_mask: torch.Tensor | None, is_causal: bool, takes_mask: bool, who: str) -> dict[str, Any]:
    """timm's mask arguments to pass on to a block: none when unset.

    Args:
        attn_mask: timm's attention mask, or None.
        is_causal: timm's causal flag.
        takes_mask: Whether the block takes them (see `accepts_mask`).
        who: The block, for the error.

    Returns:
        `{}` when neither is set, else both as keyword arguments.

    Raises:
        TypeError: If one is set and the block takes none.
    """
    if attn_mask is None and not is_causal:
        return {}
    if not takes_mask:
        raise TypeError(f"{who} takes no attn_mask or is_causal")
    return {"attn_mask": attn_mask, "is_causal": is_causal}

