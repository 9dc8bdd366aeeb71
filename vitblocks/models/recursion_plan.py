"""The record of a recursion of timm blocks: which shared block runs in each original block's place.

Plain data built from each stack's schedule: nothing here touches a model.
`make_recursive` returns a plan; `load_base_weights` and `convert_to_recursive` follow it
to load and convert the base model's weights.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from vitblocks.layers.sharing import loop_indices, runs_of


@dataclass
class RecursionPlan:
    """Where each original block went, for loading and converting weights of the base model.

    Attributes:
        applications: Original block path (e.g. "blocks.3") -> (the path of the shared
            block that now runs in its place, the loop index of that use).
        unit_sizes: Stack path -> blocks per unit of recursion (Swin: 2).
    """

    applications: dict[str, tuple[str, int]] = field(default_factory=dict)
    unit_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def block_paths(self) -> dict[str, str | None]:
        """Original block path -> its path in the rewritten model when it is the first use of
        its shared block (its weights load there), or None when it reuses a block placed earlier."""
        return {original: path if loop == 0 else None for original, (path, loop) in self.applications.items()}

    def add_stack(self, stack: str, assignment: Sequence[int], unit_size: int, sequence: bool = False,
                  relaxed: Collection[int] = (), routed: Collection[int] = ()) -> None:
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
            routed: The unique units wrapped in `TokenRouting` (their blocks sit under `.block`).
        """
        if sequence:
            unit_paths = {u: f"{stack}.0.blocks.{u}" for u in set(assignment)}
        else:
            unit_paths = {assignment[run[0]]: f"{stack}.{r}.block" for r, run in enumerate(runs_of(assignment))}
        self.unit_sizes[stack] = unit_size
        for position, (unit, loop) in enumerate(zip(assignment, loop_indices(assignment))):
            for k in range(unit_size):
                wrapped = (".shared" if unit in relaxed else "") + (".block" if unit in routed else "")
                path = unit_paths[unit] + wrapped + (f".{k}" if unit_size > 1 else "")
                self.applications[f"{stack}.{position * unit_size + k}"] = (path, loop)

    def new_path(self, key: str) -> str | None:
        """Where a key of the base model's state dict goes.

        Args:
            key: A base-model state-dict key.

        Returns:
            The rewritten model's key, None for a block dropped by sharing, or `key`
            itself when it is outside every planned block.
        """
        for original in sorted(self.applications, key=len, reverse=True):
            if key.startswith(original + "."):
                moved, loop = self.applications[original]
                return None if loop else moved + key[len(original):]
        return key
