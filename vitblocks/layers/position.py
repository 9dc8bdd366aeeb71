"""A learnable 2-D position map that follows the input's resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


def resize_position_map(pos: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize a (1, C, H, W) position map to `size` = (H', W'); TorchScript compiles it.

    Args:
        pos: The map.
        size: Target height and width.
        mode: Interpolation mode of `torch.nn.functional.interpolate`.

    Returns:
        The resized map; `pos` itself when it already has that size.
    """
    if pos.shape[-2] == size[0] and pos.shape[-1] == size[1]:
        return pos
    return F.interpolate(pos.float(), size=[size[0], size[1]], mode=mode, align_corners=False).to(pos.dtype)


class PositionMap(nn.Module):
    """Learnable absolute position embedding added to a (B, C, H, W) feature map.

    Inputs of another resolution get the map resized (bicubic), so a model trained at
    224 runs at 384 or 512; to fine-tune at a new size, resize the stored weight once
    with `resize_position_map`. Loading a state dict whose map has the same channels but
    another grid resizes it to this module's grid.

    Args:
        dim: Channels C.
        grid_size: Height and width of the stored map (an int for a square map).
        mode: Interpolation mode used for other resolutions.
        device: Where the map lives.
        dtype: Dtype of the map.

    Examples:
        >>> import torch
        >>> pos = PositionMap(64, 28)
        >>> pos(torch.zeros(1, 64, 48, 48)).shape
        torch.Size([1, 64, 48, 48])
    """

    def __init__(
        self,
        dim: int,
        grid_size: int | tuple[int, int],
        mode: str = "bicubic",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        grid = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.weight = nn.Parameter(torch.zeros(1, dim, *grid, device=device, dtype=dtype))
        self.mode = mode
        trunc_normal_(self.weight, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        key = prefix + "weight"
        stored = state_dict.get(key)
        if stored is not None and stored.dim() == 4 and stored.shape[:2] == self.weight.shape[:2]:
            state_dict[key] = resize_position_map(stored, tuple(self.weight.shape[-2:]), self.mode)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the (resized) map to `x` of shape (B, C, H, W)."""
        return add_position_map(x, self.weight, self.mode)


def add_position_map(x: torch.Tensor, pos: torch.Tensor, mode: str) -> torch.Tensor:
    """Add a position map to a feature map, resized to the feature map's size if needed.

    TorchScript compiles it, and `torch.fx` records it as one call (the size check
    branches on the input's shape).

    Args:
        x: Feature map (B, C, H, W).
        pos: Position map (1, C, h, w).
        mode: Interpolation mode for another size.

    Returns:
        `x + pos`, with `pos` resized to (H, W), in the dtype of `x` (under autocast the
        map then does not turn a bfloat16 stem output into a float32 residual stream).

    Raises:
        ValueError: If `x` is not a (B, C, H, W) map with the map's channels.
    """
    if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != pos.shape[1]):  # a trace records no check
        raise ValueError(f"PositionMap expects (batch, {pos.shape[1]}, height, width) inputs, got shape {x.shape}")
    return x + resize_position_map(pos, (x.shape[-2], x.shape[-1]), mode).to(x.dtype)


torch.fx.wrap("add_position_map")
