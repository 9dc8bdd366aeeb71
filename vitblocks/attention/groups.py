"""How the tokens of one sequence are split into attention groups.

A sequence holds `num_prefix_tokens` prefix tokens (class / distillation tokens)
followed by `num_tokens` patch tokens. The patch tokens are cut, in order, into
`num_groups` contiguous groups whose sizes differ by at most one (the first
`num_tokens % num_groups` groups take one extra token).

The prefix rule: a prefix token attends to every token and every token attends to
the prefix tokens; a patch token attends only to the prefix tokens and to the patch
tokens of its own group. With no prefix tokens this is the block-diagonal mask of
sliced group self-attention; with one group it is full attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class GroupRun(NamedTuple):
    """A run of consecutive groups that all have the same size.

    Attributes:
        start: Offset of the run's first patch token (prefix tokens not counted).
        count: Number of groups in the run.
        size: Tokens per group.
    """

    start: int
    count: int
    size: int

    @property
    def stop(self) -> int:
        """Offset one past the run's last patch token."""
        return self.start + self.count * self.size


def group_runs(num_tokens: int, num_groups: int) -> list[tuple[int, int, int]]:
    """(start, count, size) of the runs of equal groups that split `num_tokens` tokens.

    The first `num_tokens % num_groups` groups take one extra token, so there are at
    most two runs, larger groups first. Plain ints in and out, so tracers with symbolic
    shapes take it (`//` and `%`, never `divmod`).

    Args:
        num_tokens: Patch tokens N.
        num_groups: Groups g, 1 <= g <= N.

    Returns:
        The runs as (start offset, group count, group size).

    Examples:
        >>> group_runs(10, 4)
        [(0, 2, 3), (6, 2, 2)]
    """
    base = num_tokens // num_groups
    extra = num_tokens % num_groups
    runs: list[tuple[int, int, int]] = []
    if extra > 0:
        runs.append((0, extra, base + 1))
    if num_groups > extra:
        runs.append((extra * (base + 1), num_groups - extra, base))
    return runs


@dataclass(frozen=True)
class TokenGroups:
    """A partition of patch tokens into near-equal contiguous groups.

    Args:
        num_tokens: Number of patch tokens N (prefix tokens excluded).
        num_groups: Number of groups g, with 1 <= g <= N.
        num_prefix_tokens: Tokens in front of the patch tokens that attend to and are
            attended by every token.

    Attributes:
        num_tokens: Number of patch tokens N.
        num_groups: Number of groups g.
        num_prefix_tokens: Number of prefix tokens.

    Raises:
        ValueError: If the counts are out of range.

    Examples:
        >>> TokenGroups(num_tokens=10, num_groups=4).sizes
        (3, 3, 2, 2)
    """

    num_tokens: int
    num_groups: int
    num_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {self.num_prefix_tokens}")
        if not 1 <= self.num_groups <= self.num_tokens:
            raise ValueError(
                f"groups={self.num_groups} cannot split {self.num_tokens} patch tokens: "
                f"use 1 <= groups <= {self.num_tokens} (the number of patch tokens), "
                "or feed a larger input"
            )

    @property
    def equal(self) -> bool:
        """Whether every group has the same size."""
        return self.num_tokens % self.num_groups == 0

    @property
    def sizes(self) -> tuple[int, ...]:
        """Size of every group, in order."""
        return tuple(size for run in self.runs for size in [run.size] * run.count)

    @property
    def runs(self) -> tuple[GroupRun, ...]:
        """The groups as at most two runs of equal-size groups (larger groups first)."""
        return tuple(GroupRun(*run) for run in group_runs(self.num_tokens, self.num_groups))

    def group_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Group id of every patch token.

        Args:
            device: Device of the result.

        Returns:
            int64 tensor of shape (num_tokens,).
        """
        sizes = torch.tensor(self.sizes, device=device)
        return torch.repeat_interleave(torch.arange(self.num_groups, device=device), sizes)

    def materialize(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Dense boolean mask of the whole sequence, True where attention is allowed.

        Args:
            device: Device of the result.

        Returns:
            Tensor of shape (P + N, P + N) where P is `num_prefix_tokens`; row i says
            which keys query i may attend to.
        """
        p = self.num_prefix_tokens
        ids = self.group_index(device)
        mask = torch.ones(p + self.num_tokens, p + self.num_tokens, dtype=torch.bool, device=device)
        mask[p:, p:] = ids[:, None] == ids[None, :]
        return mask


def fold_run(x: torch.Tensor, start: int, count: int, size: int) -> torch.Tensor:
    """Fold one run of equal groups into the batch dimension.

    Args:
        x: Patch tokens (B, N, H, D).
        start: Offset of the run's first token.
        count: Groups in the run.
        size: Tokens per group.

    Returns:
        (B * count, size, H, D).
    """
    return x[:, start : start + count * size].reshape(x.shape[0] * count, size, x.shape[2], x.shape[3])


def with_prefix(groups_kv: torch.Tensor, prefix_kv: torch.Tensor, count: int) -> torch.Tensor:
    """Prepend each sample's prefix keys (or values) to each of its `count` groups.

    Args:
        groups_kv: Folded keys or values (B * count, size, H, D).
        prefix_kv: The prefix tokens' keys or values (B, P, H, D).
        count: Groups per sample.

    Returns:
        (B * count, P + size, H, D).
    """
    b, p, h, d = prefix_kv.shape[0], prefix_kv.shape[1], prefix_kv.shape[2], prefix_kv.shape[3]
    prefix = prefix_kv.unsqueeze(1).expand(b, count, p, h, d).reshape(b * count, p, h, d)
    return torch.cat([prefix, groups_kv], dim=1)
