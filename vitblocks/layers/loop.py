"""Calling modules that may or may not take a loop index."""

from __future__ import annotations

import inspect

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
