"""Planning a recursion of timm blocks: which original blocks each recursive block replaces.

Pure functions of block counts and options: nothing here touches a model. `make_recursive`
applies a plan; `load_base_weights` follows one to load the base model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """Where each original block went, for loading weights of the base model.

    Attributes:
        block_paths: Original block path (e.g. "blocks.3") -> its path in the rewritten
            model, or None when it was dropped because it shares an earlier block's weights.
    """

    block_paths: dict[str, str | None] = field(default_factory=dict)

    def add_stack(self, stack: str, runs: list[list[int]], unit_size: int) -> None:
        """Record the blocks of one stack.

        Args:
            stack: The stack's module path, e.g. "transformers.1.blocks".
            runs: From `plan_runs`.
            unit_size: Blocks per unit (Swin: 2).
        """
        for r, run in enumerate(runs):
            for position, unit in enumerate(run):
                for k in range(unit_size):
                    inner = f"{stack}.{r}.block" + (f".{k}" if unit_size > 1 else "")
                    self.block_paths[f"{stack}.{unit * unit_size + k}"] = inner if position == 0 else None

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
