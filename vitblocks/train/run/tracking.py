"""Experiment tracking: TensorBoard event files and Weights & Biases runs, from the main process.

    config.logging.tensorboard = True                          # OUTPUT_DIR/tensorboard/
    config.logging.wandb = {"project": "sret", "entity": "me"} # any wandb.init arguments

Both log the same: the training loss at each read (`log_every` steps) with the learning
rate, every epoch's metrics row (validation loss, top-1, top-5, EMA top-1, img/s, loader
wait), and once the run header (model size, data, step) as text. A resumed run continues
the same records: TensorBoard drops what the interrupted run logged after its
checkpoint (`purge_step`), and the wandb run id is kept in `OUTPUT_DIR/wandb-run-id`, so
`--resume` appends to the same wandb run. Both are optional extras
(`pip install -e ".[tracking]"`); only the main process writes.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from vitblocks.train.outputs.run_folder import WANDB_FOLDER, WANDB_ID
from vitblocks.train.process.extras import import_train_extra
from vitblocks.train.run.hooks import Callback, LossRecord, RunView


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {f"epoch/{key}": float(value) for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"}


def _step_losses(records: list[LossRecord]) -> dict[int, float]:
    """Mean loss per optimizer step (several batches make one step when gradients accumulate)."""
    sums: dict[int, list[float]] = {}
    for record in records:
        sums.setdefault(record.step, []).append(record.loss)
    return {step: sum(values) / len(values) for step, values in sums.items()}


class TensorBoardLogging(Callback):
    """Write TensorBoard event files to `OUTPUT_DIR/tensorboard` (the `tensorboard` package).

    Args:
        folder: Where the event files go (default: the run's `tensorboard/`).
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder, self.writer = folder, None

    def on_fit_start(self, run: RunView) -> None:
        if not run.runtime.is_main:
            return
        import_train_extra("tensorboard", extra="tracking")
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(self.folder) if self.folder else run.run_folder.tensorboard_folder()
        # a resumed run replaces what the interrupted one logged after its checkpoint
        self.writer = SummaryWriter(str(folder), purge_step=run.state.step + 1 if run.resumed else None)
        self.writer.add_text("run", run.header, run.state.step)

    def on_losses_read(self, run: RunView, losses: list[LossRecord]) -> None:
        if self.writer is None:
            return
        for step, loss in _step_losses(losses).items():
            self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", run.optimizer.param_groups[0]["lr"], losses[-1].step)

    def on_epoch_recorded(self, run: RunView, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for name, value in _scalars(row).items():
            self.writer.add_scalar(name, value, run.state.step)
        self.writer.flush()

    def on_fit_end(self, run: RunView) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbLogging(Callback):
    """Log to Weights & Biases (the `wandb` package); `WANDB_MODE=offline` works without a network.

    Args:
        settings: `wandb.init` arguments (project, entity, name, tags, mode, ...); `dir`
            defaults to the run folder, `config` to the run's config.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings, self.run = dict(settings), None

    def on_fit_start(self, run: RunView) -> None:
        if not run.runtime.is_main:
            return
        wandb = import_train_extra("wandb", extra="tracking")
        from vitblocks.train.config.recipe import to_dict

        id_file = run.run_folder.file(WANDB_ID)
        run_id = id_file.read_text().strip() if run.resumed and id_file.is_file() else secrets.token_hex(4)
        run.run_folder.write_text(WANDB_ID, run_id + "\n")
        run.run_folder.file(WANDB_FOLDER)  # wandb writes its files there: never through a link
        settings = {"dir": str(run.output_dir), "config": to_dict(run.config), **self.settings}
        self.run = wandb.init(id=run_id, resume="allow", **settings)
        self.run.summary["run header"] = run.header

    def on_losses_read(self, run: RunView, losses: list[LossRecord]) -> None:
        if self.run is None:
            return
        steps = _step_losses(losses)
        for step, loss in steps.items():
            values = {"train/loss": loss}
            if step == losses[-1].step:
                values["train/lr"] = run.optimizer.param_groups[0]["lr"]
            self.run.log(values, step=step)

    def on_epoch_recorded(self, run: RunView, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(_scalars(row), step=run.state.step)

    def on_fit_end(self, run: RunView) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

