"""Learnable scalar gates."""

from __future__ import annotations

import torch
from torch import nn


def learnable_scalar(
    value: float = 1.0, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Parameter:
    """A one-element trainable parameter.

    Args:
        value: Initial value.
        device: Where the parameter lives.
        dtype: Its dtype (default: torch's default float dtype).

    Returns:
        The parameter, shape (1,).
    """
    return nn.Parameter(torch.full((1,), float(value), device=device, dtype=dtype))
