"""LoopPlan: what one loop of a sliced attention layer does besides its weights."""

# No `from __future__ import annotations` here: TorchScript reads a NamedTuple's field
# types from its annotations, and cannot resolve them as strings.
from typing import NamedTuple

import torch


class LoopPlan(NamedTuple):
    """What one loop of a `SlicedGroupAttention` does besides its weights.

    Computed outside the layer's arithmetic (`SlicedGroupAttention.loop_plan`), so that a
    compiled block takes it as input and every loop with the same group count runs the
    same compiled code, whatever its index.

    Attributes:
        num_groups: Groups of patch tokens.
        perm: Permutation of the patch tokens applied before grouping, or None.
        inverse: The permutation that puts them back, or None.
    """

    num_groups: int
    perm: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
