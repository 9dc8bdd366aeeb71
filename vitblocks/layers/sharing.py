"""Sharing schedules: which unique block each layer position of a stack uses.

A schedule is an *assignment*: for each position of a stack (each layer of the
unshared model), the index of the unique block whose weights it runs. Three ways to
name one:

- `"consecutive"` — runs of `loops` neighbouring positions share a block (SReT:
  A A B B C C);
- `"cycle"` — the unique blocks are applied in turn, `loops` times over (ALBERT,
  Universal Transformers: A B C A B C);
- an explicit sequence such as `(0, 1, 0, 1, 2, 2)`.

The `n`-th use of a unique block is its loop `n`: loop-aware blocks (sliced attention,
per-loop LoRA, per-loop mix layers) tell their uses apart by it, whatever the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vitblocks.layers.loop import check_loop_count

SCHEDULES = ("consecutive", "cycle")
"""Named schedules; an explicit assignment is the third kind."""

Sharing = str | Sequence[int]
"""A schedule name or an explicit assignment."""


def sharing_assignment(share: Sharing, num_positions: int, loops: int = 2, where: str = "the stack") -> tuple[int, ...]:
    """The unique-block index of every position.

    Args:
        share: "consecutive", "cycle", or an explicit assignment (one index per
            position; the indices used must be 0, 1, ..., K-1 for K unique blocks).
        num_positions: Positions (layers) of the stack.
        loops: Uses of each unique block for the named schedules: K = ceil(positions /
            loops) unique blocks (a short last run, or cycle, uses some fewer times).
        where: The stack, for messages.

    Returns:
        The assignment.

    Raises:
        ValueError: For an unknown name, or an explicit assignment of the wrong length,
            with an index out of range, or leaving a unique block unused.

    Examples:
        >>> sharing_assignment("consecutive", 6), sharing_assignment("cycle", 6)
        ((0, 0, 1, 1, 2, 2), (0, 1, 2, 0, 1, 2))
    """
    check_loop_count(loops)
    if isinstance(share, str):
        unique = math.ceil(num_positions / loops)
        if share == "consecutive":
            return tuple(i // loops for i in range(num_positions))
        if share == "cycle":
            return tuple(i % unique for i in range(num_positions))
        raise ValueError(f"share={share!r} is not one of {SCHEDULES} or an assignment (one block index per position)")
    return check_assignment(share, num_positions, where)


def check_assignment(assignment: Sequence[int], num_positions: int, where: str = "the stack") -> tuple[int, ...]:
    """Validate an explicit assignment.

    Args:
        assignment: One unique-block index per position.
        num_positions: Positions of the stack.
        where: The stack, for messages.

    Returns:
        The assignment as a tuple.

    Raises:
        ValueError: Saying what is wrong and what a valid assignment looks like.
    """
    if isinstance(assignment, (str, bytes)) or not isinstance(assignment, Sequence):
        raise ValueError(f"share must be {SCHEDULES[0]!r}, {SCHEDULES[1]!r} or a sequence of block indices, "
                         f"got {assignment!r}")
    values = tuple(assignment)
    if len(values) != num_positions:
        raise ValueError(f"the assignment {values} has {len(values)} entries but {where} has {num_positions} "
                         f"positions; give one unique-block index per position")
    for position, index in enumerate(values):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_positions:
            raise ValueError(f"the assignment {values} has index {index!r} at position {position}; indices are "
                             f"ints in [0, {num_positions}) for {where}")
    unused = sorted(set(range(max(values) + 1)) - set(values))
    if unused:
        raise ValueError(f"the assignment {values} never uses unique block(s) {unused}; number the unique blocks "
                         f"0, 1, ..., K-1 with each used at least once")
    return values


def is_consecutive(assignment: Sequence[int]) -> bool:
    """Whether every unique block's positions form one run of neighbours.

    Args:
        assignment: One unique-block index per position.

    Returns:
        True if each block is used in one run (it can then be a `Recursive`).

    Examples:
        >>> is_consecutive((0, 0, 1, 1, 2)), is_consecutive((0, 1, 0, 1))
        (True, False)
    """
    seen: set[int] = set()
    for i, index in enumerate(assignment):
        if index in seen and assignment[i - 1] != index:
            return False
        seen.add(index)
    return True


def runs_of(assignment: Sequence[int]) -> list[list[int]]:
    """The positions of each run of equal neighbouring indices, in order.

    Args:
        assignment: One unique-block index per position.

    Returns:
        Positions per run.

    Examples:
        >>> runs_of((0, 0, 1, 2, 2))
        [[0, 1], [2], [3, 4]]
    """
    runs: list[list[int]] = []
    for i, index in enumerate(assignment):
        if runs and assignment[runs[-1][0]] == index:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def loop_indices(assignment: Sequence[int]) -> tuple[int, ...]:
    """For each position, how many earlier positions use the same unique block (its loop).

    Args:
        assignment: One unique-block index per position.

    Returns:
        The loop index of every position.

    Examples:
        >>> loop_indices((0, 1, 2, 0, 1, 2))
        (0, 0, 0, 1, 1, 1)
    """
    uses: dict[int, int] = {}
    loops = []
    for index in assignment:
        loops.append(uses.get(index, 0))
        uses[index] = loops[-1] + 1
    return tuple(loops)


def cycle_period(assignment: Sequence[int]) -> int | None:
    """The cycle length of an assignment that is whole cycles of blocks 0..K-1.

    Args:
        assignment: One unique-block index per position.

    Returns:
        K for `(0, 1, ..., K-1)` repeated, else None.
    """
    unique = max(assignment) + 1
    if len(assignment) % unique or any(index != i % unique for i, index in enumerate(assignment)):
        return None
    return unique
