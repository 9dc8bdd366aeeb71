"""Stochastic depth whose rate is data, so blocks of different rates share compiled code."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Drop a residual branch per sample in training, scaling kept samples by 1 / keep.

    It computes what `timm.layers.DropPath` computes, but holds the keep probability in a
    (non-persistent) buffer rather than a Python float: `torch.compile` then treats the
    rate as an input instead of a constant, and blocks that differ only in their rate (as
    along a stochastic-depth schedule) run the same compiled graph. This keeps the number
    of graphs of `compile_regions` at one per stage shape and loop kind.

    Args:
        drop_prob: Probability of dropping the branch of a sample, in [0, 1).

    Raises:
        ValueError: For a rate outside [0, 1).

    Examples:
        >>> import torch
        >>> drop = DropPath(0.25).train()
        >>> out = drop(torch.ones(1000, 3))
        >>> sorted(set(out[:, 0].tolist()))  # dropped rows are 0, kept ones scaled by 1/0.75
        [0.0, 1.3333333730697632]
    """

    def __init__(self, drop_prob: float = 0.0, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply stochastic depth (training mode only).

        Args:
            x: A residual branch, batch first.

        Returns:
            `x` with whole samples zeroed and the rest scaled, or `x` itself in eval mode.
        """
        if not self.training:
            return x
        return x * keep_mask(x, self.keep_prob).to(x.dtype)

    def gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-sample factor `forward` multiplies by, or None in eval mode.

        A block that scales its branch anyway folds this factor into that scale
        (`vitblocks.layers.residual.scaled_residual`), so stochastic depth costs it two
        operators on a (B, 1, ..., 1) tensor and no pass over the branch
        (`TransformerBlock.draw_drop_masks` draws several such factors at once).

        Args:
            x: The residual branch it would be applied to.

        Returns:
            float32 (B, 1, ..., 1): 0 for dropped samples, 1 / keep for the others.
        """
        return keep_mask(x, self.keep_prob) if self.training else None

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def keep_mask(x: torch.Tensor, keep_prob: torch.Tensor, draws: int = 0) -> torch.Tensor:
    """One Bernoulli(keep) draw per sample of `x`, scaled by 1 / keep, shaped to broadcast.

    A function of its own so that `torch.fx` records it as one call (`torch.fx.wrap`):
    the mask's shape follows the rank of `x`, which symbolic tracing cannot read.

    Args:
        x: Batch-first tensor.
        keep_prob: 0-dim probability of keeping a sample (float32).
        draws: 0 for one mask; otherwise that many independent masks, stacked first.

    Returns:
        Tensor of shape (B, 1, ..., 1), or (draws, B, 1, ..., 1), in the dtype of
        `keep_prob`.
    """
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    if draws:
        shape = [draws] + shape
    return torch.bernoulli(keep_prob.expand(shape)) / keep_prob


torch.fx.wrap("keep_mask")
