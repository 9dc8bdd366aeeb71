"""Planning a recursion of timm blocks: which original blocks each recursive block replaces.

Pure functions of block counts and options: nothing here touches a model. `make_recursive`
applies a plan; `load_base_weights` follows one to load the base model's weights.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from vitblocks.layers.sharing import loop_indices, runs_of


def plan_runs(num_units: int, loops: int, share: bool) -> list[list[int]]:
    """Group a stack's units (blocks, or Swin block pairs) into the runs one `Recursive` replaces.

    Args:
        num_units: Units in the stack.
        loops: Applications of each kept unit.
        share: Runs of `loops` consecutive units share the first one's weights (a short
            last run loops fewer times); otherwise every unit is its own run.

    Returns:
        Unit indices of each run; the first unit of a run keeps its weights.

    Example:
        >>> plan_runs(5, 2, share=True), plan_runs(3, 2, share=False)
        ([[0, 1], [2, 3], [4]], [[0], [1], [2]])
    """
    if share:
        return [list(range(i, min(i + loops, num_units))) for i in range(0, num_units, loops)]
    return [[i] for i in range(num_units)]


@dataclass
class RecursionPlan:
    """Where each original block went, for loading and converting weights of the base model.

    Attributes:
        block_paths: Original block path (e.g. "blocks.3") -> its path in the rewritten
            model when it is the first use of its shared block (its weights load there),
            or None when it reuses a block placed earlier.
        applications: Original block path -> (the path of the shared block that now runs
            in its place, the loop index of that use).
        unit_sizes: Stack path -> blocks per unit of recursion (Swin: 2).
    """

    block_paths: dict[str, str | None] = field(default_factory=dict)
    applications: dict[str, tuple[str, int]] = field(default_factory=dict)
    unit_sizes: dict[str, int] = field(default_factory=dict)

    def add_stack(self, stack: str, assignment: Sequence[int], unit_size: int, sequence: bool = False,
                  relaxed: Collection[int] = ()) -> None:
        """Record the blocks of one stack.

        Args:
            stack: The stack's module path, e.g. "transformers.1.blocks".
            assignment: The unique unit each original unit uses (see
                `vitblocks.layers.sharing`); `range(n)` for unshared (deepened) units.
            unit_size: Blocks per unit (Swin: 2).
            sequence: The stack holds one `SharedSequence` (else a `Recursive` per run
                of equal neighbouring indices).
            relaxed: The unique units wrapped in `RelaxedBlock`s (their blocks sit under
                `.shared`).
        """
        if sequence:
            unit_paths = {u: f"{stack}.0.blocks.{u}" for u in set(assignment)}
        else:
            unit_paths = {assignment[run[0]]: f"{stack}.{r}.block" for r, run in enumerate(runs_of(assignment))}
        self.unit_sizes[stack] = unit_size
        for position, (unit, loop) in enumerate(zip(assignment, loop_indices(assignment))):
            for k in range(unit_size):
                path = unit_paths[unit] + (".shared" if unit in relaxed else "") + (f".{k}" if unit_size > 1 else "")
                original = f"{stack}.{position * unit_size + k}"
                self.block_paths[original] = path if loop == 0 else None
                self.applications[original] = (path, loop)

    def new_path(self, key: str) -> str | None:
        """Where a key of the base model's state dict goes.

        Args:
            key: A base-model state-dict key.

        Returns:
            The rewritten model's key, None for a block dropped by sharing, or `key`
            itself when it is outside every planned block.
        """
        for original in sorted(self.block_paths, key=len, reverse=True):
            if key.startswith(original + "."):
                moved = self.block_paths[original]
                return None if moved is None else moved + key[len(original):]
        return key
