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

    Example:
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
        keep = self.keep_prob.to(x.dtype)
        # one draw per sample on the flattened sample, with no arithmetic on x's rank,
        # which symbolic tracing (torch.fx) cannot do
        flat = x.flatten(1)
        kept = torch.rand_like(flat[:, :1]) < keep
        return (flat * (kept.to(x.dtype) / keep)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
