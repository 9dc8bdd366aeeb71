"""GroupSchedule: how many token groups sliced attention uses on each loop, defined once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GroupsSpec = "int | Sequence[int] | GroupSchedule"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class GroupSchedule:
    """Group counts per loop: loop `l` uses `counts[l]`, and the last entry repeats.

    Every layer and model that takes `groups` normalizes it here, and the rule "a loop's
    group count must not exceed the tokens it slices" is checked only by `check_fits`.

    Attributes:
        counts: Positive group counts, one per loop (at least one).

    Examples:
        >>> schedule = GroupSchedule.parse((8, 2))
        >>> schedule.at(0), schedule.at(1), schedule.at(5)
        (8, 2, 2)
        >>> tuple(s.counts for s in GroupSchedule.per_stage(((8, 2), 4, (1,)), num_stages=3))
        ((8, 2), (4,), (1,))
        >>> tuple(s.counts for s in GroupSchedule.per_stage((4, 2), num_stages=2))   # one schedule, every stage
        ((4, 2), (4, 2))
    """

    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.counts or not all(_is_count(g) for g in self.counts):
            raise ValueError(
                f"groups must be a positive int or a non-empty sequence of positive ints (one per loop), "
                f"got {self.counts!r}"
            )

    @classmethod
    def parse(cls, groups: int | Sequence[int] | GroupSchedule) -> GroupSchedule:
        """A schedule from an int (every loop), a sequence (one per loop) or a schedule.

        Args:
            groups: The `groups` argument as users write it.

        Returns:
            The schedule.

        Raises:
            ValueError: For anything but positive ints.
        """
        if isinstance(groups, GroupSchedule):
            return groups
        counts = tuple(groups) if isinstance(groups, Sequence) else (groups,)
        return cls(counts)

    @classmethod
    def per_stage(cls, groups: object, num_stages: int) -> tuple[GroupSchedule, ...]:
        """One schedule per stage (or block stack).

        Args:
            groups: An int (every stage, every loop); one schedule of ints, e.g.
                `(4, 2)` (every stage); or one entry per stage, each an int or a
                schedule, e.g. `((8, 2), (4, 1), (1, 1))`.
            num_stages: Number of stages.

        Returns:
            `num_stages` schedules.

        Raises:
            ValueError: For per-stage entries that do not match `num_stages`, or bad counts.
        """
        if isinstance(groups, GroupSchedule) or not isinstance(groups, Sequence) or all(_is_count(g) for g in groups):
            return (cls.parse(groups),) * num_stages
        if len(groups) != num_stages:
            raise ValueError(f"groups gives {len(groups)} schedules for {num_stages} stages: {groups!r}")
        return tuple(cls.parse(g) for g in groups)

    def at(self, loop: int) -> int:
        """The group count of one loop.

        Args:
            loop: Loop index.

        Returns:
            The count; the last entry repeats for later loops.
        """
        return self.counts[min(loop, len(self.counts) - 1)]

    def largest(self, loops: int | None = None) -> int:
        """The largest group count over the first `loops` loops (all entries if None).

        Args:
            loops: Number of loops that run.

        Returns:
            The largest count.
        """
        return max(self.counts if loops is None else [self.at(i) for i in range(loops)])

    def check_fits(self, num_tokens: int, loops: int | None = None, where: str = "", loop: int | None = None) -> None:
        """Check that no loop has more groups than tokens.

        Args:
            num_tokens: Tokens that are sliced (patch tokens).
            loops: Loops that run (default: every entry of the schedule).
            where: What the tokens are, for the message (e.g. "stage 2's 4x4 map").
            loop: Check this loop only.

        Raises:
            ValueError: Naming the schedule, the tokens, and what to change.

        Examples:
            >>> GroupSchedule((8, 2)).check_fits(4, loop=1)
            >>> GroupSchedule((8, 2)).check_fits(4, where="a 2x2 map")
            Traceback (most recent call last):
            ...
            ValueError: group schedule (8, 2) needs at least 8 tokens but gets 4 (a 2x2 map); use a larger image or fewer groups
        """  # noqa: E501 (a doctest's expected exception message must stay on one line)
        needed = self.largest(loops) if loop is None else self.at(loop)
        if num_tokens < needed:
            on_loop = "" if loop is None else f" on loop {loop}"
            place = f" ({where})" if where else ""
            raise ValueError(
                f"group schedule {self.counts} needs at least {needed} tokens{on_loop} but gets {num_tokens}{place}; "
                "use a larger image or fewer groups"
            )

    def __len__(self) -> int:
        return len(self.counts)
