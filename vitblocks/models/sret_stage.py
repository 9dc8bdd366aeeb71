"""One SReT stage: an optional downsampling, then weight-shared transformer blocks on its token map."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from vitblocks.layers import NonLinearMix, TransformerBlock
from vitblocks.layers.early_exit import EarlyExit
from vitblocks.layers.mix import mix_for_mode
from vitblocks.layers.modes import MixMode
from vitblocks.layers.routing import TokenRouting
from vitblocks.layers.schedule import GroupSchedule
from vitblocks.layers.shared_sequence import shared_layers
from vitblocks.layers.sharing import Sharing, sharing_assignment


class SReTStage(nn.Module):
    """One SReT stage: optional pooling, then recursive blocks over the flattened map.

    Args:
        dim: Token channels.
        num_heads: Attention heads.
        unique_blocks: Blocks with their own weights.
        loops: Applications of each block.
        groups: Per-loop group schedule shared by the stage's blocks, e.g. `(8, 2)`.
        mlp_ratio: Block MLP width ratio.
        mix: "per_loop" (a NonLinearMix after every application), "shared" (one per
            block, reused by its loops) or "none".
        mix_mlp_ratio: NonLinearMix MLP width ratio.
        drop_path_rates: Drop-path rate of each unique block.
        share: Which block each of the `unique_blocks * loops` positions uses:
            "consecutive" (SReT: A A B B), "cycle" (A B A B) or an explicit assignment
            (see `vitblocks.layers.sharing`).
        downsample: Pooling applied first (None for the first stage).
        block_kwargs: Further `TransformerBlock` arguments (dropouts, permutation
            policies, attention backend).
        routing: Token routing of every block (`TokenRouting` options, e.g.
            `{"capacity": 0.5}`), or None.
        seed: Base seed of the blocks' fixed permutations.
        device: Where the parameters live.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        unique_blocks: int,
        loops: int,
        groups: int | Sequence[int] | GroupSchedule,
        mlp_ratio: float,
        mix: MixMode | str,
        mix_mlp_ratio: float,
        drop_path_rates: Sequence[float],
        share: Sharing = "consecutive",
        downsample: nn.Module | None = None,
        block_kwargs: dict[str, Any] | None = None,
        routing: dict[str, Any] | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.downsample = downsample or nn.Identity()
        self.schedule = GroupSchedule.parse(groups)
        self.groups = self.schedule.counts
        block_kwargs = block_kwargs or {}
        mix_factory = partial(NonLinearMix, dim, mix_mlp_ratio, drop=block_kwargs.get("proj_drop", 0.0), **dd)
        assignment = sharing_assignment(share, unique_blocks * loops, loops, where="the stage")
        if max(assignment) + 1 != unique_blocks:
            raise ValueError(f"share={share!r} uses {max(assignment) + 1} unique blocks; the stage has {unique_blocks}")

        def block(i: int) -> nn.Module:
            built = TransformerBlock(
                dim, num_heads, mlp_ratio=mlp_ratio, drop_path=drop_path_rates[i],
                residual_scalars=True, groups=self.schedule, seed=seed + i, **block_kwargs, **dd,
            )
            if routing is None:
                return built
            return TokenRouting(built, dim, loops=assignment.count(i), **routing, **dd)

        # consecutive: a Recursive per block, each built just before its mix layers (the paper's layout and
        # initialisation order); any other schedule: one SharedSequence
        self.blocks = nn.ModuleList(shared_layers(assignment, block, partial(mix_for_mode, mix, mix_factory)))

    @property
    def loops(self) -> int:
        """Uses of the stage's most used block: the loops its group schedule must fit (read from the layers,
        so test-time depth changes it)."""
        return max(max(layer.block_uses) for layer in self.blocks)

    def check_grid(self, height: int, width: int, where: str = "") -> None:
        """Check that a map has enough tokens for every loop's group count.

        Args:
            height: Map height.
            width: Map width.
            where: Which stage, for the message.

        Raises:
            ValueError: If height * width is smaller than a group count of the schedule.
        """
        self.schedule.check_fits(height * width, self.loops, where=f"{where}{height}x{width} map")

    def forward(self, x: torch.Tensor, early_exit: EarlyExit | None = None,
                head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Map (B, C_in, H, W) to (B, dim, H', W').

        Args:
            x: The input map.
            early_exit: Exits among the stage's block applications, or None.
            head: With `early_exit`: a (B, dim, H', W') map to logits.

        Returns:
            The output map.
        """
        x = self.downsample(x)
        height, width = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C); a view of a channels-last map

        def as_map(tokens: torch.Tensor) -> torch.Tensor:
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)

        if early_exit is not None:
            return as_map(early_exit.run(self.blocks, x, lambda tokens: head(as_map(tokens))))
        for block in self.blocks:
            x = block(x)
        return as_map(x)
