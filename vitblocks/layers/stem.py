"""Convolutional stem: three stride-2 3x3 convolutions (total stride 8)."""

from __future__ import annotations

import torch
from torch import nn


def downsampled_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Map size after a stride-`stride` reduction by stride-2, padding-1 3x3 convolutions
    or pooling layers: ceil(size / stride), as the convolutions compute it.

    The one definition of stem and stage geometry: `SReT` sizes its position map with it
    and `stage_grids` derives every stage's map from it, so they always agree.

    Args:
        size: Input height and width.
        stride: Total reduction (a power of two).

    Returns:
        (height, width) of the reduced map.

    Examples:
        >>> downsampled_size((224, 224), 8), downsampled_size((100, 61), 8)
        ((28, 28), (13, 8))
    """
    return -(-size[0] // stride), -(-size[1] // stride)


def checked_images(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Refuse input that is not a batch of `in_chans`-channel images, saying what to change.

    A function of its own so that `torch.fx` records it as one call (`torch.fx.wrap`)
    rather than tracing its branches.

    Args:
        x: The input.
        in_chans: Channels the stem was built for.

    Returns:
        `x`.

    Raises:
        ValueError: If `x` is not (B, in_chans, H, W), naming its shape and the fix.
    """
    if torch.jit.is_tracing() or (x.ndim == 4 and x.shape[1] == in_chans):  # a trace records no check
        return x
    expected = f"images of shape (batch, {in_chans}, height, width), got {tuple(x.shape)}"
    if x.ndim == 3 and x.shape[0] == in_chans:
        raise ValueError(f"expected {expected}: add the batch dimension (images.unsqueeze(0))")
    if x.ndim == 4:
        raise ValueError(f"expected {expected}: the model takes {in_chans}-channel images (create it with "
                         f"in_chans={x.shape[1]} for {x.shape[1]}-channel ones, or convert the images)")
    raise ValueError(f"expected {expected}")


torch.fx.wrap("checked_images")


class ConvStem(nn.Module):
    """SReT's stem: Conv3x3/2 + BN + ReLU, three times: in -> C/2 -> C -> C.

    It computes in channels-last memory format, whose convolutions are faster on CPU
    (about 10% of a SReT-T training step; see `benchmarks/`), and whose output flattens
    to (B, H*W, C) tokens as a view rather than a copy.

    Args:
        in_chans: Image channels.
        embed_dim: Output channels C.
        norm_layer: Norm class after each conv, called as `norm_layer(channels)`.
        act_layer: Activation class after each norm.
        device: Where the parameters live.
        dtype: Dtype of the parameters.

    Examples:
        >>> import torch
        >>> ConvStem(3, 64)(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 64, 28, 28])
    """

    stride = 8

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 64,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        dd = {"device": device, "dtype": dtype}
        widths = (in_chans, embed_dim // 2, embed_dim, embed_dim)
        for i in range(3):
            self.add_module(f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1, **dd))
            self.add_module(f"bn{i + 1}", norm_layer(widths[i + 1], **dd))
            self.add_module(f"act{i + 1}", act_layer())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, in_chans, H, W) to channels-last maps (B, C, ceil(H/8), ceil(W/8)).

        Raises:
            ValueError: If `x` is not a batch of `in_chans`-channel images.
        """
        x = checked_images(x, self.in_chans).contiguous(memory_format=torch.channels_last)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.act3(self.bn3(self.conv3(x)))
