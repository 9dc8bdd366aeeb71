"""PiT-style pooling between stages: a strided depthwise convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitblocks.layers.layout import lay_out_channels_last


class ConvPool(nn.Module):
    """Halve the resolution and widen the channels with a grouped convolution.

    Kernel `stride + 1`, padding `stride // 2`, one group per input channel, so each
    input channel feeds `out_dim // in_dim` output channels.

    Two ways to run it, with the same parameter and result: a grouped convolution whose
    groups each make `out_dim // in_dim` channels (cuDNN may run that as one kernel per
    group), or each input channel repeated that many times in one copy and a plain
    depthwise convolution over the result (one kernel). By default CUDA inputs take the
    second way: on an H200 in bfloat16 it ran SReT-T's poolings forward + backward 1.9x
    (64 to 128 channels) and 2.5x (128 to 256) faster, with 22 kernels per call against
    99 and 163 (`benchmarks.gpu_step pool`, docs/benchmarks.md).

    Args:
        in_dim: Input channels.
        out_dim: Output channels, a multiple of `in_dim`.
        stride: Spatial reduction.
        repeat_input: Repeat the input channels and run a depthwise convolution: True,
            False, or None (the default) for CUDA inputs only.
        device: Where the parameters live.
        dtype: Dtype of the parameters.

    Raises:
        ValueError: If `out_dim` is not a multiple of `in_dim`.

    Examples:
        >>> import torch
        >>> ConvPool(64, 128)(torch.randn(1, 64, 28, 28)).shape
        torch.Size([1, 128, 14, 14])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        stride: int = 2,
        repeat_input: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if out_dim % in_dim:
            raise ValueError(f"out_dim={out_dim} must be a multiple of in_dim={in_dim}")
        self.conv = nn.Conv2d(in_dim, out_dim, stride + 1, stride=stride, padding=stride // 2, groups=in_dim,
                              device=device, dtype=dtype)
        lay_out_channels_last(self.conv)  # its input is channels-last (see ConvStem)
        self.repeat_input = repeat_input

    __constants__ = ["repeat_input"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_dim, H, W) to (B, out_dim, H', W')."""
        repeat = self.repeat_input
        if repeat is None:  # an FX proxy has no device: symbolic traces keep the module call
            repeat = not isinstance(x, torch.fx.Proxy) and x.is_cuda
        if not repeat:
            return self.conv(x)
        conv = self.conv
        return depthwise_on_repeated_channels(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0])


def depthwise_on_repeated_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                                   padding: int) -> torch.Tensor:
    """A grouped convolution with `weight.shape[0] // C` outputs per input channel, as a depthwise one.

    Each input channel is repeated that many times (one copy, channels-last), then every
    channel is convolved with its own filter. A function of its own so that `torch.fx`
    records it as one call (it reads the input's shape).

    Args:
        x: (B, C, H, W), best channels-last.
        weight: (C * m, 1, k, k) filters, as `nn.Conv2d(C, C * m, k, groups=C)` holds them.
        bias: (C * m,) or None.
        stride: Stride.
        padding: Padding.

    Returns:
        What `F.conv2d(x, weight, bias, stride, padding, groups=C)` returns.
    """
    batch, channels, height, width = x.shape
    copies = weight.shape[0] // channels
    repeated = (x.permute(0, 2, 3, 1).unsqueeze(-1).expand(batch, height, width, channels, copies)
                .reshape(batch, height, width, channels * copies).permute(0, 3, 1, 2))
    return F.conv2d(repeated, weight, bias, stride, padding, groups=channels * copies)


torch.fx.wrap("depthwise_on_repeated_channels")
