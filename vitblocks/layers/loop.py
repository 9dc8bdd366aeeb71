"""Calling modules that may or may not take a loop index."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def accepts_loop(module: nn.Module) -> bool:
    """Whether `module.forward` has a parameter named `loop`."""
    try:
        return "loop" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # builtins and some C-implemented modules have no signature
        return False


def call_with_loop(module: nn.Module, x: torch.Tensor, loop: int, takes_loop: bool) -> torch.Tensor:
    """`module(x, loop=loop)` for loop-aware modules, `module(x)` for the rest."""
    return module(x, loop=loop) if takes_loop else module(x)
