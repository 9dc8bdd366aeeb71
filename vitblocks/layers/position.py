"""A learnable 2-D position map that follows the input's resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


def resize_position_map(pos: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize a (1, C, H, W) position map to `size` = (H', W').

    Args:
        pos: The map.
        size: Target height and width.
        mode: Interpolation mode of `torch.nn.functional.interpolate`.

    Returns:
        The resized map; `pos` itself when it already has that size.
    """
    if tuple(pos.shape[-2:]) == tuple(size):
        return pos
    return F.interpolate(pos.float(), size=size, mode=mode, align_corners=False).to(pos.dtype)


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

    Example:
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
        if x.dim() != 4 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"PositionMap expects (batch, {self.weight.shape[1]}, height, width) inputs, got {tuple(x.shape)}"
            )
        return x + resize_position_map(self.weight, tuple(x.shape[-2:]), self.mode)
