"""Learnable scalar gates."""

from __future__ import annotations

import torch
from torch import nn


def learnable_scalar(value: float = 1.0) -> nn.Parameter:
    """A one-element trainable parameter.

    Args:
        value: Initial value.

    Returns:
        The parameter, shape (1,).
    """
    return nn.Parameter(torch.full((1,), float(value)))
