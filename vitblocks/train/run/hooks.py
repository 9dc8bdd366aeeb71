"""The hooks a callback can implement (`Callback`), and what they are given (`RunView`).

Kept apart from the callbacks themselves (`vitblocks.train.run.callbacks`), so that optional
callbacks (`vitblocks.train.run.tracking`) build on them without importing the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn


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


class RunView:
    """What a callback sees of a run: its parts, where it is, and the two things a callback
    may do (write a checkpoint, evaluate a model). The trainer makes one per run.

    Attributes:
        config: The experiment (`TrainConfig`).
        state: Where the run is (`TrainingState`: epoch, batch, step, history, ...).
        model: The trained model.
        optimizer: Its optimizer.
        ema: The EMA of the weights (timm's `ModelEmaV3`, its `module` the weights), or None.
        data: Datasets, samplers and loaders (`vitblocks.train.data.run_data.Data`).
        device: Where the run trains.
        runtime: The processes (`rank`, `world_size`, `is_main`, `distributed`).
        output_dir: The run's folder.
        run_folder: Its files (`vitblocks.train.outputs.run_folder.RunFolder`): the only writer of them.
        steps_per_epoch: Batches per epoch and process.
        resumed: Whether the run continues from a checkpoint.
        last_good_checkpoint: The last checkpoint written or resumed from, or None.
        header: The run header (model size, data, device, the step, output).

    Args:
        trainer: The run's trainer (read through the names above only).
    """

    NAMES = ("config", "state", "model", "optimizer", "ema", "data", "device", "runtime", "output_dir", "run_folder",
             "steps_per_epoch", "resumed", "last_good_checkpoint", "header", "save", "evaluate", "stop_requested")
    """Everything a view gives."""

    __slots__ = ("_trainer",)

    def __init__(self, trainer: Any) -> None:
        object.__setattr__(self, "_trainer", trainer)

    def __getattr__(self, name: str) -> Any:
        if name in RunView.NAMES:
            return getattr(self._trainer, name)
        raise AttributeError(f"a callback sees the run through a RunView ({', '.join(RunView.NAMES)}); it has no "
                             f"{name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a RunView is read-only: a callback cannot set {name!r} on the run")

    def __dir__(self) -> list[str]:
        return sorted({*RunView.NAMES, *object.__dir__(self)})

    def save(self, name: str = "last.pth") -> Path | None:
        """Write a checkpoint of the run now (main process; call it on every process alike).

        Args:
            name: The file inside the run's folder.

        Returns:
            The path written, or None on other processes.
        """
        return self._trainer.save(name)

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Loss, top-1 and top-5 (%) on the validation set, over all processes.

        Args:
            model: The model to evaluate (default: the trained one).

        Returns:
            `val_loss`, `val_top1`, `val_top5`.
        """
        return self._trainer.evaluate(model)

    def stop_requested(self) -> str | None:
        """Why the run is about to stop, if it is (it stops after the current step).

        Returns:
            The stop signal's name, or a loader worker's death on this process; None if neither came.
        """
        return self._trainer.stop_cause()


class Callback:
    """Hooks around the training loop; every method does nothing by default.

    Each hook is given the run's `RunView` (named `trainer` in the signatures below, as
    callbacks have always named it). Callbacks written for the trainer itself read the
    same names through the view; what it does not give (the trainer's `epoch`, `step`,
    `history`, `best_top1`, `scheduler`, `lr`, its private attributes) raises an
    `AttributeError` naming what it does give: `run.state.epoch`, `run.state.step`,
    `run.state.history` and `run.state.best_top1` hold the first four.
    """

    def on_fit_start(self, trainer: RunView) -> None:
        """Before the first epoch of `fit` (also after a resume).

        Args:
            trainer: The run.
        """

    def on_loss(self, trainer: RunView, loss: torch.Tensor) -> None:
        """After each batch's forward pass, before its backward pass.

        Reading the loss here (`.item()`, `if loss ...`) waits for the device every
        step; callbacks that need its value use `on_losses_read`.

        Args:
            trainer: The run (`trainer.state.batch` is the batch's index in the epoch).
            loss: The batch's loss, still on the device.
        """

    def on_losses_read(self, trainer: RunView, losses: list[LossRecord]) -> None:
        """After the losses since the last read were copied to the host in one transfer.

        The trainer reads them every `log_every` optimizer steps, at the end of an
        epoch and before writing any checkpoint, so steps in between never wait for
        the device.

        Args:
            trainer: The run.
            losses: The batches' losses, in order.
        """

    def on_step_end(self, trainer: RunView) -> None:
        """After every optimizer step.

        Args:
            trainer: The run (`trainer.state.step` counts the step).
        """

    def on_epoch_end(self, trainer: RunView, row: dict[str, Any]) -> None:
        """After an epoch's evaluation, before the epoch is recorded and checkpointed.

        Args:
            trainer: The run.
            row: The epoch's metrics; callbacks may add entries.
        """

    def on_epoch_recorded(self, trainer: RunView, row: dict[str, Any]) -> None:
        """After the epoch is in `trainer.state.history` and `last.pth` is written.

        Args:
            trainer: The run.
            row: The epoch's metrics.
        """

    def on_fit_end(self, trainer: RunView) -> None:
        """When `fit` ends, however it ends (finished, stopped by a signal, diverged): close files.

        Args:
            trainer: The run.
        """
