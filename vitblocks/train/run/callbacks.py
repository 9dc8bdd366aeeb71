"""Callbacks: what happens around the training loop, as a list of small objects.

The `Trainer` calls every callback's hooks in order, each with the run's `RunView`
(`vitblocks.train.run.hooks`): what a callback may read and do, not the trainer itself. The default list
(`default_callbacks`) stops a run whose loss is no longer finite, checkpoints mid-epoch
on a cadence, evaluates the EMA weights, and logs metrics. Add your own:

    class PrintLr(Callback):
        def on_step_end(self, run):
            print(run.optimizer.param_groups[0]["lr"])

    Trainer(config, callbacks=[*default_callbacks(config), PrintLr()])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vitblocks.train.errors import TrainingDiverged
from vitblocks.train.process.logs import logger
from vitblocks.train.run.hooks import Callback, LossRecord, RunView

if TYPE_CHECKING:
    from vitblocks.train.config.schema import TrainConfig


class OnStepEnd(Callback):
    """A callback from a function of the run (its `RunView`), called after every optimizer step.

    Args:
        fn: Called as `fn(run)` with the run's `RunView`.
    """

    def __init__(self, fn: Callable[[RunView], None]) -> None:
        self.fn = fn

    def on_step_end(self, run: RunView) -> None:
        self.fn(run)


class DivergenceStop(Callback):
    """Stop with `TrainingDiverged` when a loss is NaN or infinite, naming the last good checkpoint.

    Losses are checked when the trainer reads them (`on_losses_read`): at most
    `log_every` steps after the first bad one, and always before a checkpoint is written.
    """

    def on_losses_read(self, run: RunView, losses: list[LossRecord]) -> None:
        for record in losses:
            if not math.isfinite(record.loss):
                kept = run.last_good_checkpoint or "none written yet"
                raise TrainingDiverged(
                    f"loss is {record.loss} at step {record.step} (epoch {record.epoch}, batch {record.batch}); "
                    f"stopped. Last good checkpoint: {kept}. Try a lower optim.lr, optim.clip_grad, or fp32."
                )


class CheckpointCadence(Callback):
    """Write `last.pth` every `every_steps` optimizer steps within an epoch.

    Args:
        every_steps: The cadence; 0 for end-of-epoch checkpoints only.
    """

    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps

    def on_step_end(self, run: RunView) -> None:
        state = run.state
        if self.every_steps and state.step % self.every_steps == 0 and state.batch < run.steps_per_epoch:
            run.save()


class EmaEvaluation(Callback):
    """Add the top-1 of the EMA weights (`ema_top1`) to each epoch's metrics."""

    def on_epoch_end(self, run: RunView, row: dict[str, Any]) -> None:
        if run.ema is not None:
            row["ema_top1"] = run.evaluate(run.ema.module)["val_top1"]


class MetricsLogging(Callback):
    """Log one line per epoch and keep `metrics.csv` current, on the main process.

    TensorBoard and wandb record the same rows only when `config.logging` asks for them
    (`vitblocks.train.run.tracking`).
    """

    def on_epoch_recorded(self, run: RunView, row: dict[str, Any]) -> None:
        if not run.runtime.is_main:
            return
        run.run_folder.write_metrics(run.state.history)
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


class RunHeader(Callback):
    """Log what a run is before it starts: model size, data, device, precision, output (`RunView.header`)."""

    def on_fit_start(self, run: RunView) -> None:
        if run.runtime.is_main:
            logger.info(run.header)


def default_callbacks(config: TrainConfig) -> list[Callback]:
    """The callbacks every run has unless told otherwise.

    Args:
        config: The experiment.

    Returns:
        Run header, divergence stop, checkpoint cadence, EMA evaluation and metrics logging,
        and the trackers `config.logging` turns on.
    """
    callbacks: list[Callback] = [RunHeader(), DivergenceStop(), CheckpointCadence(config.checkpoint.every_steps),
                                 EmaEvaluation(), MetricsLogging()]
    if config.logging.tensorboard or config.logging.wandb is not None:
        from vitblocks.train.run.tracking import TensorBoardLogging, WandbLogging

        if config.logging.tensorboard:
            callbacks.append(TensorBoardLogging())
        if config.logging.wandb is not None:
            callbacks.append(WandbLogging(config.logging.wandb))
    return callbacks
