"""PiT-style pooling between stages: a strided depthwise convolution."""

from __future__ import annotations

import torch
from torch import nn

from vitblocks.layers.layout import lay_out_channels_last


class ConvPool(nn.Module):
    """Halve the resolution and widen the channels with a grouped convolution.

    Kernel `stride + 1`, padding `stride // 2`, one group per input channel, so each
    input channel feeds `out_dim // in_dim` output channels.

    Args:
        in_dim: Input channels.
        out_dim: Output channels, a multiple of `in_dim`.
        stride: Spatial reduction.
        device: Where the parameters live.
        dtype: Dtype of the parameters.

    Raises:
        ValueError: If `out_dim` is not a multiple of `in_dim`.

    Example:
        >>> import torch
        >>> ConvPool(64, 128)(torch.randn(1, 64, 28, 28)).shape
        torch.Size([1, 128, 14, 14])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        stride: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if out_dim % in_dim:
            raise ValueError(f"out_dim={out_dim} must be a multiple of in_dim={in_dim}")
        self.conv = nn.Conv2d(in_dim, out_dim, stride + 1, stride=stride, padding=stride // 2, groups=in_dim,
                              device=device, dtype=dtype)
        lay_out_channels_last(self.conv)  # its input is channels-last (see ConvStem)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_dim, H, W) to (B, out_dim, H', W')."""
        return self.conv(x)
