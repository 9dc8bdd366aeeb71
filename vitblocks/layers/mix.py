"""NonLinearMix: the unshared layer placed after each application of a shared block."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import Mlp
from torch import nn

from vitblocks.layers.modes import MixMode
from vitblocks.layers.residual import scaled_residual
from vitblocks.layers.scalar import learnable_scalar

torch.fx.wrap("scaled_residual")  # torch.fx records it as one call: it branches on whether gradients are needed


class NonLinearMix(nn.Module):
    """Gated MLP residual that keeps repeated applications of one block apart.

    Computes `z = b1 * y + b2 * MLP(LN(y))` with a GELU MLP and learnable scalars b1, b2
    initialised to 1 — SReT's non-linear projection layer. It has no attention and no
    drop path, so it is cheap next to the block it follows.

    Args:
        dim: Token channels.
        mlp_ratio: Hidden width as a multiple of `dim` (hidden = int(dim * mlp_ratio)).
        act_layer: Activation class of the MLP.
        norm_layer: Norm class, called as `norm_layer(dim)`.
        drop: Dropout inside the MLP.
        device: Where the parameters live.
        dtype: Dtype of the parameters.

    Examples:
        >>> import torch
        >>> mix = NonLinearMix(192)
        >>> mix(torch.randn(2, 49, 192)).shape
        torch.Size([2, 49, 192])
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 1.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, **dd)
        self.skip_scale = learnable_scalar(**dd)
        self.branch_scale = learnable_scalar(**dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix tokens of shape (B, N, C); returns the same shape."""
        return scaled_residual(x, self.skip_scale, self.mlp(self.norm(x)), self.branch_scale)


def mix_for_mode(mode: MixMode | str, factory: Callable[[], nn.Module]) -> Callable[[], nn.Module] | nn.Module | None:
    """Turn a mix mode name into what `Recursive(mix=...)` takes.

    Args:
        mode: "per_loop" (one unshared layer per loop), "shared" (one layer for every
            loop) or "none".
        factory: Builds one mix layer.

    Returns:
        `factory`, a single layer it built, or None.

    Raises:
        ValueError: For an unknown mode.
    """
    mode = MixMode.parse(mode, "mix")
    if mode is MixMode.PER_LOOP:
        return factory
    return factory() if mode is MixMode.SHARED else None
