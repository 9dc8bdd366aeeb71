"""Memory layout of convolution weights for channels-last inputs."""

from __future__ import annotations

import torch
from torch import nn


def lay_out_channels_last(conv: nn.Conv2d) -> nn.Conv2d:
    """Store a convolution's weight channels-last, the layout autograd gives its gradient.

    A convolution over channels-last inputs returns its weight gradient channels-last;
    a weight stored the same way takes that gradient as it is, where a contiguous one
    costs a layout copy per step (and DDP a stride warning for its gradient buckets).
    Values, shape and state-dict key are unchanged, and later copies into the weight
    (`load_state_dict`, `.to(device)`) keep the layout. Only for weights that stay
    contiguous that way (one input channel per group, as a depthwise convolution's):
    safetensors refuses to save a non-contiguous tensor.

    Args:
        conv: The convolution, changed in place.

    Returns:
        `conv`.
    """
    weight = conv.weight.data
    out, channels, height, width = weight.shape
    # explicit strides: with one input channel `contiguous(memory_format=channels_last)` keeps the old ones
    laid_out = torch.empty_strided(weight.shape, (channels * height * width, 1, width * channels, channels),
                                   dtype=weight.dtype, device=weight.device)
    conv.weight.data = laid_out.copy_(weight)
    return conv
