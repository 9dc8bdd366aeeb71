"""The hooks a callback can implement (`Callback`), and what they are given.

Kept apart from the callbacks themselves (`vitblocks.train.callbacks`), so that optional
callbacks (`vitblocks.train.tracking`) build on them without importing the defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from vitblocks.train.engine import Trainer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class LossRecord(NamedTuple):
    """One batch's loss, read from the device, and where it was (1-based).

    Attributes:
        step: The optimizer step the batch belongs to.
        epoch: Its epoch.
        batch: Its index in the epoch.
        loss: The loss.
    """

    step: int
    epoch: int
    batch: int
    loss: float


class Callback:
    """Hooks around the training loop; every method does nothing by default."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch of `fit` (also after a resume).

        Args:
            trainer: The trainer.
        """

    def on_loss(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """After each batch's forward pass, before its backward pass.

        Reading the loss here (`.item()`, `if loss ...`) waits for the device every
        step; callbacks that need its value use `on_losses_read`.

        Args:
            trainer: The trainer (`trainer.state.batch` is the batch's index in the epoch).
            loss: The batch's loss, still on the device.
        """

    def on_losses_read(self, trainer: Trainer, losses: list[LossRecord]) -> None:
        """After the losses since the last read were copied to the host in one transfer.

        The trainer reads them every `log_every` optimizer steps, at the end of an
        epoch and before writing any checkpoint, so steps in between never wait for
        the device.

        Args:
            trainer: The trainer.
            losses: The batches' losses, in order.
        """

    def on_step_end(self, trainer: Trainer) -> None:
        """After every optimizer step.

        Args:
            trainer: The trainer (`trainer.state.step` counts the step).
        """

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After an epoch's evaluation, before the epoch is recorded and checkpointed.

        Args:
            trainer: The trainer.
            row: The epoch's metrics; callbacks may add entries.
        """

    def on_epoch_recorded(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After the epoch is in `trainer.state.history` and `last.pth` is written.

        Args:
            trainer: The trainer.
            row: The epoch's metrics.
        """

    def on_fit_end(self, trainer: Trainer) -> None:
        """When `fit` ends, however it ends (finished, stopped by a signal, diverged): close files.

        Args:
            trainer: The trainer.
        """
