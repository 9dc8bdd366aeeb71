"""Learnable scalar gates."""

from __future__ import annotations

import torch
from torch import nn


def learnable_scalar(value: float = 1.0) -> nn.Parameter:
    """A one-element trainable parameter, initialised to `value`."""
    return nn.Parameter(torch.full((1,), float(value)))
