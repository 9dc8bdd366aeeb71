"""The training loop: one `Trainer` for every model, driven by a `TrainConfig`.

The trainer is assembled from parts that `vitblocks.train.run.builders` builds from the
config (model, data, optimizer and schedule, criterion); hand any of them in to replace
it. Where the run stands is one `TrainingState`; what happens around the loop
(checkpoint cadence, EMA evaluation, logging, stopping a diverged run) is a list of
`vitblocks.train.run.callbacks`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, distribute_bn, random_seed
from torch import nn

import vitblocks.train.process.distributed as distributed
from vitblocks.attention import attention_backend
from vitblocks.layers.early_exit import exit_logits
from vitblocks.layers.routing import auxiliary_loss
from vitblocks.train.config.schema import TrainConfig
from vitblocks.train.data.run_data import Data
from vitblocks.train.data.timm_datasets import is_stream
from vitblocks.train.errors import ConfigError, DataError, LoaderWorkerDied, TrainingDiverged, TrainingInterrupted
from vitblocks.train.outputs.checkpointer import Checkpointer
from vitblocks.train.outputs.report import final_summary
from vitblocks.train.outputs.run_folder import BEST, LAST, RunFolder
from vitblocks.train.outputs.run_lock import RunLock
from vitblocks.train.outputs.run_restore import restore_missing
from vitblocks.train.outputs.state import TrainingState
from vitblocks.train.process.extras import import_train_extra
from vitblocks.train.process.logs import console_logging, logger
from vitblocks.train.process.preemption import StopSignals, loader_failure, raise_loader_failure
from vitblocks.train.run.builders import build_criterion, build_data, build_model, build_optimizer_and_schedule
from vitblocks.train.run.callbacks import default_callbacks
from vitblocks.train.run.distill import DistillationLoss
from vitblocks.train.run.evaluation import correct_counts, evaluate, read_labels
from vitblocks.train.run.header import header_text
from vitblocks.train.run.hooks import Callback, LossRecord, RunView
from vitblocks.train.run.precision import autocast_for
from vitblocks.train.run.training_model import wrap_for_training
from vitblocks.train.run.update_start import UpdateStart

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "correct_counts", "evaluate"]


class Trainer:
    """One training run, assembled from parts built from a config.

    Args:
        config: The experiment.
        output_dir: Overrides `config.output_dir`.
        model: The model (default: `build_model(config, device)`).
        data: Datasets and samplers (default: `build_data(config, runtime)`).
        optimizer: (optimizer, scheduler) (default: `build_optimizer_and_schedule`).
        criterion: (mixup or None, criterion) (default: `build_criterion(config, device)`).
        callbacks: Hooks around the loop (default: `default_callbacks(config)`).
        overwrite: Replace a run already in the output folder instead of refusing to
            start (a resumed run continues it either way).
        log_all_ranks: Show the log records of every process, not only the main one's
            (see `vitblocks.train.process.logs`).

    Examples:
        >>> from vitblocks.train import Trainer, load_recipe
        >>> trainer = Trainer(load_recipe("recipes/quickstart.py"))  # doctest: +SKIP
        >>> trainer.fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | Path | None = None,
        *,
        model: nn.Module | None = None,
        data: Data | None = None,
        optimizer: tuple[torch.optim.Optimizer, Any] | None = None,
        criterion: tuple[Mixup | None, DistillationLoss] | None = None,
        callbacks: list[Callback] | None = None,
        overwrite: bool = False,
        log_all_ranks: bool = False,
    ) -> None:
        self.config = config
        self.runtime = rt = distributed.setup()
        console_logging(rt.rank, rt.world_size, all_ranks=log_all_ranks)
        self.output_dir = Path(output_dir or config.output_dir)
        self.run_folder = RunFolder(self.output_dir)  # names and writes every file of the run
        self.device = rt.device
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
        random_seed(config.seed, rt.rank)

        if data is not None and (data.train_feed is None or data.val_feed is None):
            raise ValueError("the Data handed to Trainer has no train_feed / val_feed: build it with "
                             "build_data(config), or give Data(..., train_feed=Feed(True, batch_size, workers, seed), "
                             "val_feed=Feed(False, ...)) (vitblocks.train.data.feed: model-ready tensors need no "
                             "normalize)")
        self.data = data or build_data(config, rt)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.model = model.to(self.device) if model is not None else build_model(config, self.device)
        if optimizer is None:
            self.optimizer, self.scheduler, self.lr = build_optimizer_and_schedule(
                self.model, config, self.data.updates_per_epoch, rt.world_size)
        else:
            (self.optimizer, self.scheduler), self.lr = optimizer, optimizer[0].param_groups[0]["lr"]
        self.mixup, self.criterion = criterion or build_criterion(config, self.device)
        self.scaler = NativeScaler(device="cuda") if config.precision == "fp16" else None
        self.ema = ModelEmaV3(self.model, decay=config.ema_decay) if config.ema_decay else None
        self.train_model, self.static_graph, self.graphs = wrap_for_training(self.model, config, rt)
        self.callbacks = list(default_callbacks(config) if callbacks is None else callbacks)
        self.state = TrainingState()
        self.checkpointer = Checkpointer(  # writes and resumes checkpoints of exactly these parts
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, ema=self.ema,
            state=self.state, data=self.data, config=config, runtime=rt, run_folder=self.run_folder,
            autocast=self._autocast)
        self.view = RunView(self)  # what callbacks see of the run
        self.overwrite = overwrite
        # losses still on the device, with where they were: read every log_every steps, not every step
        self._unread_losses: list[tuple[int, int, int, torch.Tensor]] = []
        self._last_inputs: torch.Tensor | None = None  # the batch a checkpoint's weights are tried on
        self._stop = StopSignals()
        self._update_start: UpdateStart | None = None  # where the update in progress began (gradient accumulation)
        self._lock: RunLock | None = None
        self._header: str | None = None  # made as each `fit` starts (or when asked for before one)

    # the run's position, as attributes for convenience
    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self.state.epoch

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.state.step

    @property
    def best_top1(self) -> float:
        """Best validation top-1 (%) so far."""
        return self.state.best_top1

    @property
    def history(self) -> list[dict[str, Any]]:
        """One metrics row per completed epoch."""
        return self.state.history

    @property
    def last_good_checkpoint(self) -> Path | None:
        """The last checkpoint written or resumed from (None before any)."""
        return self.checkpointer.last_good

    @property
    def resumed(self) -> bool:
        """Whether the run continues from a checkpoint (`resume`)."""
        return self.checkpointer.resumed

    @property
    def header(self) -> str:
        """The run header (`vitblocks.train.run.header.header_text`) as the last `fit` started, on the main
        process (empty on the others); before any `fit`, where the run stands now."""
        if self._header is None:
            self._header = header_text(self.view, self.static_graph)
        return self._header

    def stop_cause(self) -> str | None:
        """Why the run is about to stop, if it is.

        Returns:
            The stop signal's name or the loader worker's death on this process, or None.
        """
        return self._stop.cause()

    # ---- checkpoints -------------------------------------------------------------
    def state_dict(self, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything needed to continue this run exactly (`Checkpointer.state_dict`).

        Args:
            ranks: Every process's own part, when distributed.

        Returns:
            The checkpoint's contents.
        """
        return self.checkpointer.state_dict(ranks)

    def save(self, name: str = LAST) -> Path | None:
        """Write a checkpoint atomically (main process only), once the losses so far are read.

        Args:
            name: File name inside the output folder.

        Returns:
            The path written, or None on other processes.

        Raises:
            TrainingDiverged: For a loss or weights that are not finite; nothing is written.
        """
        self.read_losses()  # a diverged loss stops the run before anything is written
        return self.checkpointer.save(name, self._last_inputs)

    def resume(self, path: str | Path, allow_changes: Iterable[str] = ()) -> None:
        """Continue from a checkpoint written by `save` (`Checkpointer.resume`).

        Args:
            path: The checkpoint.
            allow_changes: Fields allowed to differ on purpose (`--resume-changed`).

        Raises:
            CheckpointError: If the file is damaged, belongs to a different model, or the
                run differs from it in a field not allowed.
            ConfigError: For a name in `allow_changes` that is no config field.
        """
        self.checkpointer.resume(path, allow_changes)

    # ---- steps -------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.config.precision, self.device.type)

    def _each(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self.view, *args)

    def train_epoch(self, progress: bool) -> dict[str, float]:
        """Run (the rest of) the current epoch.

        Args:
            progress: Show a progress bar.

        Returns:
            Mean training loss of the epoch, throughput (`train_img_s`: images per second
            of the epoch; `step_img_s`: images per second of the time not spent waiting
            for the loader), seconds, images seen and `data_wait_s`, the seconds the
            loop waited for the loader: when it is a large share of the epoch, the data
            path (workers, decoding) limits the run rather than the model.

        Raises:
            TrainingDiverged: On a non-finite loss (from the `DivergenceStop` callback).
        """
        config, state, accum = self.config, self.state, self.config.optim.accum_steps
        sampler = self.data.train_sampler
        sampler.set_epoch(state.epoch, skip=state.epoch_samples)
        loader = self.data.train_loader(self.device)
        self.train_model.train()
        state.start_epoch()
        start, resumed_at = time.perf_counter(), state.epoch_images  # this session's images: throughput
        bar = import_train_extra("tqdm").tqdm(total=self.steps_per_epoch, initial=state.batch,
                   desc=f"epoch {state.epoch + 1}/{config.epochs}",
                   disable=not (progress and self.runtime.is_main), leave=False, dynamic_ncols=True)
        batches, data_wait = iter(loader), 0.0
        # under torchrun a worker's death must reach every process before the next collective step
        vote_each_batch = self.runtime.distributed and getattr(loader, "has_workers", True)
        mark_updates = accum > 1 or vote_each_batch  # where a stop between a fetch and its step returns to
        self._update_start = None
        while state.batch < self.steps_per_epoch:
            if mark_updates and (state.batch % accum == 0 or self._update_start is None):  # (resumed inside one)
                self._update_start = UpdateStart.take(state, self.model, len(self._unread_losses))
            fetch = time.perf_counter()
            batch, failure = self._next_batch(batches)
            if distributed.any_rank(failure is not None, self.runtime) if vote_each_batch else failure is not None:
                self._stop_inside_update(failure, self.runtime if vote_each_batch else None)
            if batch is None:
                break
            inputs, targets = batch
            data_wait += time.perf_counter() - fetch
            if self.mixup is not None:
                inputs, targets = self.mixup(inputs, targets)
            last_of_update = (state.batch + 1) % accum == 0
            sync = contextlib.nullcontext()
            if self.runtime.distributed and not last_of_update:
                sync = self.train_model.no_sync()
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
            with sync, self._autocast():
                loss = self.criterion(inputs, self.train_model(inputs), targets)
                for weight, logits in exit_logits(self.model):  # deep supervision of early exits
                    loss = loss + weight * self._exit_loss(inputs, logits, targets)
                routing = auxiliary_loss(self.model)  # token-choice's balancing loss, weighted by the model
                if routing is not None:
                    loss = loss + routing
            self._each("on_loss", loss)
            self._unread_losses.append((state.step + 1, state.epoch + 1, state.batch + 1, loss.detach()))
            self._backward_and_update(loss / accum, last_of_update)
            self._last_inputs = inputs
            state.record_batch(inputs.shape[0], inputs.shape[0] * self.runtime.world_size)
            if last_of_update:
                if state.step % config.log_every == 0:
                    self._show_progress(bar, self.read_losses(), state.epoch_images - resumed_at, start)
                self._each("on_step_end")
                self._stop_if_asked()
            bar.update(1)
        self._show_progress(bar, self.read_losses(), state.epoch_images - resumed_at, start)
        bar.close()
        seconds = time.perf_counter() - start
        loss_sum, count, images = distributed.all_sum(
            [state.epoch_loss, state.epoch_batches, state.epoch_images - resumed_at], self.runtime)
        return {"train_loss": loss_sum / max(count, 1), "train_img_s": images / max(seconds, 1e-9),
                "seconds": seconds, "images": images, "data_wait_s": data_wait,
                "step_img_s": images / max(seconds - data_wait, 1e-9)}

    def _next_batch(self, batches: Iterator) -> tuple[Any, Exception | None]:
        """The next batch (None at the end of the loader), or why it will not come: a worker's death,
        or the dataset's own error (too many unreadable images)."""
        try:
            batch = next(batches)
        except StopIteration:
            return None, None
        except (DataError, RuntimeError) as error:
            failure = loader_failure(error, self._stop.worker_failure)
            if failure is None:
                raise
            return None, failure
        finally:
            self._stop.guard_children()  # the loader's first batch started its workers and PyTorch's handler
        return batch, None

    def _stop_inside_update(self, failure: Exception | None, runtime: distributed.Runtime | None) -> None:
        """Stop where no batch can follow, on every process alike (`runtime`: the processes that voted):
        back to the start of the update in progress; then a data error raises without a checkpoint,
        and a worker's death checkpoints and raises `TrainingInterrupted`."""
        if self._update_start is not None and self._update_start.epoch == self.state.epoch:
            self._update_start.restore(self.state, self.model)
            del self._unread_losses[self._update_start.unread_losses:]
            self.optimizer.zero_grad(set_to_none=True)
        try:
            raise_loader_failure(failure, runtime)
        except LoaderWorkerDied as died:
            self._stop_now(self._stop.worker_failure or died.cause)

    def _stop_if_asked(self, write: bool = True) -> None:
        """After an optimizer step (or an epoch's checkpoints): stop if any process received a stop
        signal or lost a loader worker.

        Args:
            write: Write `last.pth` first (False where it was just written, at an epoch's end);
                the same on every process, since writing one is a collective step.

        Raises:
            TrainingInterrupted: Naming the cause and the checkpoint to resume from.
        """
        cause = self._stop.cause()
        if distributed.any_rank(cause is not None, self.runtime):
            self._stop_now(cause or "another process was asked to stop", write)

    def _stop_now(self, cause: str, write: bool = True) -> None:
        """Write `last.pth` at the last finished step (on every process together) and raise."""
        if write:
            self.save()
        # no process leaves before the main one has written: torchrun stops the others when one exits
        distributed.any_rank(False, self.runtime)
        state = self.state
        raise TrainingInterrupted(cause, self.output_dir / LAST, state.step, state.epoch + (state.batch > 0),
                                  state.batch)

    def _exit_loss(self, inputs: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """An early exit's loss: the loss on the (mixed) labels, without the teacher (one teacher pass a step)."""
        base = getattr(self.criterion, "base", None)
        return base(logits, targets) if base is not None else self.criterion(inputs, logits, targets)

    def _show_progress(self, bar: Any, loss: float | None, images: int, start: float) -> None:
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{images * self.runtime.world_size / (time.perf_counter() - start):.0f}")

    def read_losses(self) -> float | None:
        """Copy the losses of the batches since the last read to the host, in one transfer.

        Training steps never wait for the device otherwise: the trainer calls this every
        `log_every` optimizer steps, at the end of each epoch and before writing a
        checkpoint. The losses go to the epoch's running mean and to the callbacks'
        `on_losses_read` (where `DivergenceStop` checks them).

        Returns:
            The last loss read, or None if there was none to read.

        Raises:
            TrainingDiverged: From `DivergenceStop`, for a loss that is not finite.
        """
        if not self._unread_losses:
            return None
        unread, self._unread_losses = self._unread_losses, []
        values = torch.stack([loss for *_, loss in unread]).float().tolist()
        records = [LossRecord(step, epoch, batch, value) for (step, epoch, batch, _), value in zip(unread, values)]
        if self._lock is not None:
            self._lock.refresh()
        finite = all(math.isfinite(value) for value in values)
        if distributed.any_rank(not finite, self.runtime) and finite:  # every process stops, not only the one
            raise TrainingDiverged(
                f"the loss is not finite on another process by step {records[-1].step}; stopped. Last good "
                f"checkpoint: {self.last_good_checkpoint or 'none written yet'}. Try a lower optim.lr, "
                "optim.clip_grad, or fp32.")
        self._each("on_losses_read", records)
        self.state.add_losses(values)
        return values[-1]

    def _backward_and_update(self, loss: torch.Tensor, update: bool) -> None:
        """Backward pass; on the last batch of an update, clip and step (timm's loss scaler in fp16)."""
        clip = self.config.optim.clip_grad
        if self.scaler is not None:
            self.scaler(loss, self.optimizer, clip_grad=clip, parameters=self.model.parameters(), need_update=update)
        else:
            loss.backward()
            if update:
                if clip:
                    dispatch_clip_grad(self.model.parameters(), clip)
                self.optimizer.step()
        if update:
            self._after_update()

    def _after_update(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.scheduler.step_update(num_updates=self.state.step + self.checkpointer.schedule_offset)
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.step)

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Loss, top-1 and top-5 (%) on the validation set, over all processes.

        Args:
            model: The model to evaluate (default: the trained one).

        Returns:
            `val_loss`, `val_top1`, `val_top5`.
        """
        return evaluate(model or self.model, self.data.val_loader(self.device), self.device, self._autocast(),
                        self.runtime, max_unreadable=self.config.data.max_bad_images)

    # ---- the run -----------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Train to `config.epochs`, evaluating and checkpointing every epoch.

        The output folder is locked for the run's life (`vitblocks.train.outputs.run_lock`), and
        SIGTERM, SIGINT, SIGUSR1 and SIGHUP, or a loader worker's death, stop the run after
        its current step with a resumable checkpoint (`vitblocks.train.process.preemption`).

        Args:
            progress: Show a progress bar.

        Returns:
            The last epoch's metrics, with `best_top1` added.

        Raises:
            TrainingDiverged: On a non-finite loss or weights (no checkpoint of them is written).
            TrainingInterrupted: After a stop signal or a loader worker's death, once the checkpoint
                is written.
            RunLockedError: If another live run holds the output folder.
            CheckpointError: If a file of the run cannot be written (`RunWriteError`) or the folder
                holds another run's files (`RunExistsError`) or a link (`RunLinkError`).
            DataError: For data that cannot be read or holds labels out of range.
            StoppedElsewhere: Under torchrun, on the processes that stop because another failed.
        """
        with self._stop:  # also while the run ends: closing files and workers is no start-up to stop at once
            try:
                self._lock_output_dir()
                return self._fit(progress)
            finally:
                self._each("on_fit_end")
                self.data.close()  # the loaders' workers end with the run
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None

    def _lock_output_dir(self) -> None:
        def acquire() -> None:
            self._lock = lock = self.run_folder.lock().acquire()
            if lock.took_over:
                logger.info(f"took over the lock of a run that is no longer running "
                            f"(pid {lock.took_over.get('pid')} on {lock.took_over.get('host')})")

        self._on_main(acquire)  # refused on the main process: every process stops

    def _fit(self, progress: bool) -> dict[str, Any]:
        config, state = self.config, self.state
        complete = state.epoch >= config.epochs and bool(state.history)
        self._on_main(lambda: self._prepare_output_dir(complete))
        if complete:
            logger.info(f"the run in {self.output_dir} is already complete: {state.epoch} of {config.epochs} epochs, "
                        f"best top-1 {state.best_top1:.2f}%. Raise epochs (--set epochs=N) to train further.")
            return {**state.history[-1], "best_top1": state.best_top1}
        self._header = header_text(self.view, self.static_graph) if self.runtime.is_main else ""  # as this fit starts
        self._on_every("on_fit_start")
        self._stop_before_training()
        if not state.history and is_stream(self.data.val_set):
            self._check_validation_labels()
            self._stop_before_training()
        start, images = time.perf_counter(), 0
        with attention_backend(config.model.backend):
            while state.epoch < config.epochs:
                train = self.train_epoch(progress)
                if self.runtime.distributed:  # average BatchNorm statistics so every rank evaluates one model
                    distribute_bn(self.model, self.runtime.world_size, reduce=True)
                images += train["images"]
                try:
                    row = self._evaluate_epoch(train["train_loss"])
                except LoaderWorkerDied as died:  # every process raises it: the failures were reduced
                    self._stop_now(self._stop.worker_failure or died.cause)
                row.update(lr=self.optimizer.param_groups[0]["lr"], train_img_s=train["train_img_s"],
                           step_img_s=train["step_img_s"], data_wait_s=train["data_wait_s"],
                           epoch_seconds=train["seconds"])
                improved = state.finish_epoch(row)
                if improved:  # best first: a crash between the writes leaves last.pth behind, never best.pth
                    self.save(BEST)
                self.save()
                if improved and self.runtime.is_main:
                    self.run_folder.write_best_folder(self.model, config, self.ema.module if self.ema else None,
                                                      self.data.classes, state.step)
                self._on_every("on_epoch_recorded", row)
                if state.epoch < config.epochs:
                    self._stop_if_asked(write=False)
        if self.runtime.is_main:
            self._finish(time.perf_counter() - start, images)
        return {**state.history[-1], "best_top1": state.best_top1}

    def _stop_before_training(self) -> None:
        """Before the first step, a stop (on any process) stops the run with nothing to save."""
        cause, state = self._stop.cause(), self.state
        if distributed.any_rank(cause is not None, self.runtime):
            raise TrainingInterrupted(cause or "another process was asked to stop", self.last_good_checkpoint,
                                      state.step, state.epoch + 1, state.batch, trained=False)

    def _check_validation_labels(self) -> None:
        """Read a streamed validation split once before training: a label out of range
        (`timm_datasets.LabelRange`) stops the run now, not after the first epoch."""
        try:
            if read_labels(self.data.val_loader(self.device), self.runtime,
                           stop=lambda: self._stop.cause() is not None) is not None:  # None: a stop came meanwhile
                logger.info(f"read the validation stream's labels before training: "
                            f"all in [0, {self.config.data.num_classes})")
        except LoaderWorkerDied as died:  # on every process: the run stops before its first step
            self._stop.worker_failure = self._stop.worker_failure or died.cause

    def _evaluate_epoch(self, train_loss: float) -> dict[str, Any]:
        """The epoch's metrics row: validation scores, and what the callbacks add (EMA scores)."""
        state = self.state
        row: dict[str, Any] = {"epoch": state.epoch + 1, "train_loss": train_loss, **self.evaluate()}
        if not math.isfinite(row["val_loss"]):  # the same on every process: the sums were reduced
            raise TrainingDiverged(
                f"the validation loss is {row['val_loss']} after epoch {state.epoch + 1} (step {state.step}); "
                f"stopped without recording the epoch. Last good checkpoint: "
                f"{self.last_good_checkpoint or 'none written yet'}. Try a lower optim.lr, optim.clip_grad, or fp32.")
        if row.get("val_unreadable"):
            logger.warning(f"{row['val_unreadable']} validation images cannot be read (named above); epoch "
                           f"{state.epoch + 1} is scored on the others")
        self._each("on_epoch_end", row)
        return row

    def _on_main(self, work: Callable[[], None]) -> None:
        """Run `work` on the main process; if it raises, every process stops (the others waiting for it would hang)."""
        distributed.together(work if self.runtime.is_main else lambda: None, self.runtime)

    def _on_every(self, hook: str, *args: Any) -> None:
        """Call a hook of every callback; if it raises on one process (a file the main one writes), all stop."""
        distributed.together(lambda: self._each(hook, *args), self.runtime)

    def _prepare_output_dir(self, complete: bool) -> None:
        """Refuse a folder holding another run's files (unless overwriting), and after a resume write
        again whatever the checkpoint's run should have written but the folder lacks."""
        self.run_folder.start(resumed=self.resumed, overwrite=self.overwrite)
        if self.resumed:
            restore_missing(self.run_folder, self.model, self.config, self.ema.module if self.ema else None,
                            self.data.classes, self.state.history, self.state.step, complete)

    def _finish(self, seconds: float, images: float) -> None:
        written = self.run_folder.write_model_folder(self.model, self.config, self.ema.module if self.ema else None,
                                                     self.data.classes, step=self.state.step)
        written.append(self.run_folder.write_curves(self.state.history, self.state.step))
        logger.info(final_summary(self.state.history, seconds, int(images), self.run_folder.summary_files(written)))
