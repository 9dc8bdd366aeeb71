"""TrainingState: where a run is, as one object that saves and restores itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainingState:
    """The position and record of a training run (everything but model and optimizer).

    Attributes:
        epoch: Completed epochs.
        batch: Batches done in the current epoch.
        step: Optimizer steps done.
        epoch_loss: Sum of the current epoch's batch losses so far.
        epoch_batches: Batches behind `epoch_loss`.
        epoch_images: Images this process has seen in the current epoch so far.
        epoch_samples: Samples of the current epoch's order consumed so far by all
            processes together: where a resumed epoch continues, whatever its batch size.
        best_top1: Best validation top-1 (%) so far; -1 before the first evaluation.
        history: One metrics row per completed epoch.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    epoch_loss: float = 0.0
    epoch_batches: int = 0
    epoch_images: int = 0
    epoch_samples: int = 0
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def start_epoch(self) -> None:
        """Clear the running totals when an epoch starts from its first batch."""
        if self.batch == 0:
            self.epoch_loss, self.epoch_batches, self.epoch_images, self.epoch_samples = 0.0, 0, 0, 0

    def record_batch(self, images: int, samples: int | None = None) -> None:
        """Count one batch (its loss arrives later, through `add_losses`).

        Args:
            images: Its size.
            samples: Samples it consumed over all processes (default: `images`).
        """
        self.batch += 1
        self.epoch_batches += 1
        self.epoch_images += images
        self.epoch_samples += images if samples is None else samples

    def add_losses(self, losses: list[float]) -> None:
        """Add batch losses read from the device to the epoch's running sum.

        Args:
            losses: Losses of batches already counted by `record_batch`.
        """
        for loss in losses:  # one at a time: the same sum whichever steps the reads fall on
            self.epoch_loss += loss

    def finish_epoch(self, row: dict[str, Any]) -> bool:
        """Record an epoch's metrics and move to the next epoch.

        Args:
            row: The epoch's metrics, with `val_top1`.

        Returns:
            Whether the epoch set a new best top-1.
        """
        self.history.append(row)
        self.epoch, self.batch, self.epoch_samples = self.epoch + 1, 0, 0
        improved = row["val_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, row["val_top1"])
        return improved

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (the same keys trainer checkpoints have always had).

        Returns:
            The state.
        """
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "epoch_totals": [self.epoch_loss, self.epoch_batches, self.epoch_images],
            "epoch_samples": self.epoch_samples,
            "best_top1": self.best_top1,
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict` output (or a whole trainer checkpoint).

        Args:
            state: The saved state.
        """
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.epoch_loss, self.epoch_batches, self.epoch_images = state.get("epoch_totals", [0.0, 0, 0])
        self.epoch_samples = state.get("epoch_samples", 0)
        self.best_top1 = state["best_top1"]
        self.history = [dict(row) for row in state["history"]]
