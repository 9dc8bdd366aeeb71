"""Callbacks: what happens around the training loop, as a list of small objects.

The `Trainer` calls every callback's hooks in order. The default list
(`default_callbacks`) stops a run whose loss is no longer finite, checkpoints mid-epoch
on a cadence, evaluates the EMA weights, and logs metrics. Add your own::

    class PrintLr(Callback):
        def on_step_end(self, trainer):
            print(trainer.optimizer.param_groups[0]["lr"])

    Trainer(config, callbacks=[*default_callbacks(config), PrintLr()])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from vitblocks.train.compile_modes import describe_compile
from vitblocks.train.feed import describe_feed
from vitblocks.train.hooks import Callback, LossRecord, TrainingDiverged
from vitblocks.train.logs import logger

if TYPE_CHECKING:
    from vitblocks.train.config import TrainConfig
    from vitblocks.train.engine import Trainer


class OnStepEnd(Callback):
    """A callback from a function of the trainer, called after every optimizer step.

    Args:
        fn: Called as `fn(trainer)`.
    """

    def __init__(self, fn: Callable[[Trainer], None]) -> None:
        self.fn = fn

    def on_step_end(self, trainer: Trainer) -> None:
        self.fn(trainer)


class DivergenceStop(Callback):
    """Stop with `TrainingDiverged` when a loss is NaN or infinite, naming the last good checkpoint.

    Losses are checked when the trainer reads them (`on_losses_read`): at most
    `log_every` steps after the first bad one, and always before a checkpoint is written.
    """

    def on_losses_read(self, trainer: Trainer, losses: list[LossRecord]) -> None:
        for record in losses:
            if not math.isfinite(record.loss):
                kept = trainer.last_good_checkpoint or "none written yet"
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

    def on_step_end(self, trainer: Trainer) -> None:
        state = trainer.state
        if self.every_steps and state.step % self.every_steps == 0 and state.batch < trainer.steps_per_epoch:
            trainer.save()


class EmaEvaluation(Callback):
    """Add the top-1 of the EMA weights (`ema_top1`) to each epoch's metrics."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if trainer.ema is not None:
            row["ema_top1"] = trainer.evaluate(trainer.ema.module)["val_top1"]


class MetricsLogging(Callback):
    """Log one line per epoch and keep `metrics.csv` current, on the main process.

    TensorBoard and wandb record the same rows only when `config.logging` asks for them
    (`vitblocks.train.tracking`).
    """

    def on_epoch_recorded(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if not trainer.runtime.is_main:
            return
        trainer.run_folder.write_metrics(trainer.state.history)
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


class RunHeader(Callback):
    """Log what a run is before it starts: model size, data, device, precision, output.

    The text is also kept as `trainer.header` (the trackers record it).
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.runtime.is_main:
            return
        trainer.header = header_text(trainer)
        logger.info(trainer.header)


def header_text(trainer: Trainer) -> str:
    """The run header: model size, data and how it is fed, device, the step, output.

    Args:
        trainer: The trainer.

    Returns:
        Five lines.
    """
    config, data = trainer.config, trainer.data
    params = sum(p.numel() for p in trainer.model.parameters())
    size, training = f"{params:,} parameters", trainer.model.training
    try:
        from vitblocks.summary import summarize

        with torch.random.fork_rng(devices=[]):  # a resumed run's random streams stay untouched
            macs = summarize(trainer.model, config.data.img_size)[-1].macs
        size += f", {macs / 1e9:.3f} GMACs per image at {config.data.img_size} px"
    except Exception:  # noqa: BLE001 - a model the counter cannot run (e.g. on a GPU): its size is enough
        pass
    finally:
        trainer.model.train(training)
    source = config.data.dataset + (f" {config.data.root}" if config.data.dataset == "imagefolder" else "")
    start = "resuming at " if trainer.resumed else ""
    return (
        f"model    {config.model.name}: {size}\n"
        f"data     {source}: {len(data.train_set):,} train / {len(data.val_set):,} val images, "
        f"{len(data.classes)} classes{_per_class(data.train_set)}; "
        f"{describe_feed(data.train_loader(trainer.device), config.data.workers)}\n"
        f"runs on  {trainer.device} x {trainer.runtime.world_size}, {config.precision}, "
        f"attention backend {config.model.backend}\n"
        f"step     {describe_step(trainer)}\n"
        f"output   {trainer.output_dir} ({start}epoch {trainer.state.epoch + 1} of {config.epochs})"
    )


def describe_step(trainer: Trainer) -> str:
    """What one training step runs, and why, as the run header states it.

    Args:
        trainer: The trainer.

    Returns:
        Compile mode and its reason, the optimizer's kernel, and how often the step
        waits for the device.
    """
    config = trainer.config
    optimizer = type(trainer.optimizer).__name__
    defaults = trainer.optimizer.defaults
    kernel = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") is not False else "for-loop"
    accumulate = f", {config.optim.accum_steps} batches per update" if config.optim.accum_steps > 1 else ""
    ddp = ""
    if trainer.runtime.distributed:
        ddp = "; DDP with " + ("a static graph, " if trainer.static_graph else "") + "gradients as bucket views" + (
            ", all-reducing only each update's last batch (no_sync)" if config.optim.accum_steps > 1 else "")
    return (f"{describe_compile(config.model.compile, trainer.device)}; {optimizer} ({kernel}){accumulate}; "
            f"losses read from the device every {config.log_every} steps{ddp}")


def _per_class(dataset: Any) -> str:
    """The training images per class of an ImageFolder dataset, as the header shows them."""
    counts = dataset.class_counts() if hasattr(dataset, "class_counts") else None
    if not counts:
        return ""
    if len(counts) <= 10:
        return " (train images per class: " + ", ".join(f"{name} {n}" for name, n in counts.items()) + ")"
    low, high = min(counts, key=counts.get), max(counts, key=counts.get)
    return f" (train images per class: {counts[low]} ({low}) to {counts[high]} ({high}))"


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
        from vitblocks.train.tracking import TensorBoardLogging, WandbLogging

        if config.logging.tensorboard:
            callbacks.append(TensorBoardLogging())
        if config.logging.wandb is not None:
            callbacks.append(WandbLogging(config.logging.wandb))
    return callbacks
