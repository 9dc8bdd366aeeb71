"""What makes a training run resumable: its checkpoint, written and read back exactly.

The `Trainer` holds one `Checkpointer`, handed at construction every part it saves and
restores (model, optimizer, scheduler, scaler, EMA, `TrainingState`, data, config,
runtime, run folder); it reads nothing else of the trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

import vitblocks.train.outputs.checkpoint as ckpt
import vitblocks.train.process.distributed as distributed
from vitblocks.io import CheckpointError
from vitblocks.train.config.recipe import check_allowed_fields, to_dict
from vitblocks.train.data.datasets import dataset_length
from vitblocks.train.errors import TrainingDiverged
from vitblocks.train.outputs.health import checkpoint_problem
from vitblocks.train.outputs.resume_checks import data_identity, refused_changes, resume_changes
from vitblocks.train.outputs.run_folder import LAST, RunFolder
from vitblocks.train.process.distributed import Runtime
from vitblocks.train.process.logs import listed, logger

if TYPE_CHECKING:
    from vitblocks.train.config.schema import TrainConfig
    from vitblocks.train.data.run_data import Data
    from vitblocks.train.outputs.state import TrainingState


class Checkpointer:
    """Checkpoint writing (`save`, `state_dict`) and exact resumption (`resume`) of one run.

    Args:
        model: The trained model.
        optimizer: Its optimizer.
        scheduler: timm's per-step scheduler.
        scaler: timm's loss scaler (fp16), or None.
        ema: The EMA of the weights, or None.
        state: Where the run is (`TrainingState`), saved and restored in place.
        data: The run's data: its class names and image counts are recorded, and a
            checkpoint's class order is applied to it on resume.
        config: The run's config.
        runtime: The processes (rank, world size).
        run_folder: Where checkpoints are written.
        autocast: Makes the run's mixed-precision context, for trying the weights on a batch.

    Attributes:
        last_good: The last checkpoint written or resumed from (None before any).
        resumed: Whether the run continues from a checkpoint.
        schedule_offset: Schedule position minus optimizer steps: nonzero after resuming at
            another batch size, where the schedule continues at the same fraction of training.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                 ema: ModelEmaV3 | None, state: TrainingState, data: Data, config: TrainConfig, runtime: Runtime,
                 run_folder: RunFolder, autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.state, self.data, self.config, self.runtime, self.run_folder = state, data, config, runtime, run_folder
        self.autocast = autocast
        self.last_good: Path | None = None
        self.resumed = False
        self.schedule_offset = 0

    def state_dict(self, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything needed to continue this run exactly.

        Args:
            ranks: Every process's own part (`_own_state`), when distributed; each process
                has its own random streams and running loss sums.

        Returns:
            Model, optimizer, schedule, scaler and EMA states, the `TrainingState`, config and RNG;
            the weights also under timm's keys (`state_dict`, `state_dict_ema`).
        """
        ranks = ranks or [self._own_state()]
        model, ema = self.model.state_dict(), self.ema.module.state_dict() if self.ema else None
        return {
            "model": model,
            "state_dict": model,  # timm's names for the same tensors (stored once): its load_checkpoint and scripts
            "state_dict_ema": ema,  # read these, use_ema=True included
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": ema,
            **self.state.state_dict(),
            "classes": list(self.data.classes),
            "data": self._data_identity(),
            "config": to_dict(self.config),
            "rng": ranks[0]["rng"],  # the main process's, as checkpoints have always held
            "world_size": self.runtime.world_size,
            "ranks": ranks,
        }

    def _own_state(self) -> dict[str, Any]:
        """What differs between processes: random streams, the epoch's running sums and, when
        distributed, BatchNorm statistics (averaged over the processes only at an epoch's end)."""
        own = {"rng": ckpt.rng_state(), "epoch_totals": self.state.state_dict()["epoch_totals"]}
        if self.runtime.distributed:
            own["norm_statistics"] = {name: buffer.detach().cpu().clone() for name, buffer in self.model.named_buffers()
                                      if "running_mean" in name or "running_var" in name}
        return own

    def save(self, name: str = LAST, inputs: torch.Tensor | None = None) -> Path | None:
        """Write a checkpoint atomically (main process only), after checking that the weights are finite.

        Args:
            name: File name inside the output folder.
            inputs: The last batch, which the weights are tried on within an epoch (at an
                epoch's end they were just evaluated).

        Returns:
            The path written, or None on other processes.

        Raises:
            TrainingDiverged: If the weights (or their logits on `inputs`) are not finite on any
                process; nothing is written.
            CheckpointError: If the main process could not write the file (on every process).
        """
        at_epoch_end = self.state.batch == 0  # the weights were just evaluated: their loss is known
        problem = checkpoint_problem(self.model, self.ema.module if self.ema else None,
                                     None if at_epoch_end else inputs, self.autocast())
        if distributed.any_rank(problem is not None, self.runtime):
            raise TrainingDiverged(
                f"{problem or 'the weights diverged on another process'} after step {self.state.step} (epoch "
                f"{self.state.epoch + 1}, batch {self.state.batch}); {name} was not written. Last good checkpoint: "
                f"{self.last_good or 'none written yet'}. Try a lower optim.lr, optim.clip_grad, or fp32.")
        ranks = distributed.gather(self._own_state(), self.runtime)
        path, error = None, None
        if self.runtime.is_main:
            try:
                path = self.run_folder.write_checkpoint(self.state_dict(ranks), name)
            except CheckpointError as failed:
                error = failed
        if distributed.any_rank(error is not None, self.runtime):  # every process stops: none waits for the next step
            raise error or CheckpointError(f"the main process could not write {name}; see its message")
        if path is not None:
            self.last_good = path
        return path

    def _data_identity(self) -> dict[str, Any]:
        """What the checkpoint records of the data: class names and image counts."""
        return data_identity(self.data.classes, dataset_length(self.data.train_set), dataset_length(self.data.val_set))

    def resume(self, path: str | Path, allow_changes: Iterable[str] = ()) -> None:
        """Continue from a checkpoint written by `save`.

        The learning-rate schedule follows the current config: it is rebuilt for this
        config's epochs and set to the saved step, so resuming a finished run with more
        epochs gives the extra epochs the learning rates a run of that length has there.
        A run that differs from the checkpoint's in what a resume must keep (model,
        optimizer, classes, data, split, seed, image size: `vitblocks.train.outputs.resume_checks`)
        is refused, naming each field, unless the field is in `allow_changes`.

        Args:
            path: The checkpoint.
            allow_changes: Fields allowed to differ on purpose (`--resume-changed`), e.g.
                `["data.img_size"]`; a section allows every field below it.

        Raises:
            CheckpointError: If the file is damaged, belongs to a different model, or the
                run differs from it in a field not allowed.
            ConfigError: For a name in `allow_changes` that is no config field.
        """
        allowed = check_allowed_fields(allow_changes, self.config)
        saved = ckpt.load_training_checkpoint(path)
        changes = resume_changes(saved, to_dict(self.config), self._data_identity())
        refused = refused_changes(changes, allowed)
        if refused:
            fields = " ".join(dict.fromkeys(change.field for change in refused))
            raise ckpt.CheckpointError(
                f"{path} was written by a run that differs from this one in what a resume must keep: "
                + "; ".join(change.says for change in refused) + ". Resuming would mix two runs in one history. "
                f"Resume with the checkpoint's values, start a new run in another --output-dir (or --overwrite), or, "
                f"if the change is on purpose, say so with --resume-changed {fields}")
        for change in changes:
            logger.warning(f"resuming with a change allowed by --resume-changed: {change.says}")
        old_root = saved.get("config", {}).get("data", {}).get("root")
        compared = (saved.get("data") or {}).get("train_images") is not None and not changes
        if compared and old_root not in (None, self.config.data.root):
            logger.info(f"data.root moved from {old_root} to {self.config.data.root}: "
                        "the same classes and image counts")
        self._keep_checkpoint_labels(saved, path)
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError as error:
            detail = " ".join(str(error).split())[:600]
            raise ckpt.CheckpointError(f"{path} does not fit this model: {detail}") from error
        self._load_optimizer(saved["optimizer"], path, reset_mismatched=bool(changes))
        if self.scaler and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema and saved["ema"]:
            self.ema.module.load_state_dict(saved["ema"])
        elif self.ema:  # EMA turned on at this resume: it starts from the resumed weights, not the initial ones
            self.ema.module.load_state_dict(self.model.state_dict())
            logger.info(f"{path} holds no EMA weights; the EMA starts from its weights")
        self.state.load_state_dict(saved)
        self._continue_epoch_at_this_batch_size(saved)
        self.scheduler.step_update(num_updates=self.state.step + self.schedule_offset)
        ranks, rank = saved.get("ranks") or [], self.runtime.rank
        if len(ranks) == self.runtime.world_size:  # each process continues its own streams and sums
            ckpt.set_rng_state(ranks[rank]["rng"])
            self.state.epoch_loss, self.state.epoch_batches, self.state.epoch_images = ranks[rank]["epoch_totals"]
            buffers = dict(self.model.named_buffers())
            for name, value in ranks[rank].get("norm_statistics", {}).items():
                buffers[name].copy_(value)
        else:  # another process count (or an older checkpoint): the main process's streams for all
            ckpt.set_rng_state(saved["rng"])
        self.last_good = Path(path)
        self.resumed = True

    def _keep_checkpoint_labels(self, saved: dict[str, Any], path: str | Path) -> None:
        """Label the data by the checkpoint's class order where it numbers the same classes otherwise
        (a run written when classes were sorted as plain strings: c1, c10, c2, ...)."""
        classes = (saved.get("data") or {}).get("classes", saved.get("classes"))
        if not classes and self.config.data.dataset == "imagefolder" and sorted(self.data.classes) != self.data.classes:
            logger.warning(f"{path} stores no class names (it predates them), so its labels cannot be checked: they "
                           f"are taken in today's natural order ({listed(self.data.classes)}); a run of that age "
                           f"numbered classes in plain string order ({listed(sorted(self.data.classes))}), and its "
                           "labels then differ")
        if not classes or list(classes) == list(self.data.classes) or set(classes) != set(self.data.classes):
            return
        self.data.relabel(list(classes))
        logger.info(f"labels follow the class order stored in {path} ({listed(classes)}), which the run was "
                    "trained with, not today's natural order")

    def _load_optimizer(self, state: dict[str, Any], path: str | Path, reset_mismatched: bool) -> None:
        """Load the optimizer state after checking it parameter by parameter against this model.

        No state of another shape ever reaches the optimizer (fused kernels read it without
        checking): a mismatch is refused, naming the parameter, or, after a change the user
        allowed (a new image size resizes the position map), that parameter's state starts
        afresh.
        """
        groups, mine = state.get("param_groups", []), self.optimizer.param_groups
        if [len(group["params"]) for group in groups] != [len(group["params"]) for group in mine]:
            raise ckpt.CheckpointError(
                f"{path}: its optimizer state holds {sum(len(g['params']) for g in groups)} parameters in "
                f"{len(groups)} groups, this run's optimizer {sum(len(g['params']) for g in mine)} in {len(mine)}: "
                "the model or its weight-decay groups differ from the checkpoint's")
        names = {id(param): name for name, param in self.model.named_parameters()}
        params = [param for group in mine for param in group["params"]]
        saved_ids = [index for group in groups for index in group["params"]]
        mismatched: dict[int, tuple[str, str]] = {}  # saved index -> (parameter name, what differs)
        for index, param in zip(saved_ids, params):
            for key, value in state.get("state", {}).get(index, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    mismatched[index] = (names.get(id(param), f"parameter {index}"),
                                         f"{key} {tuple(value.shape)}, parameter {tuple(param.shape)}")
        if mismatched and not reset_mismatched:
            raise ckpt.CheckpointError(
                f"{path}: its optimizer state does not fit this model's parameters: "
                + "; ".join(f"{name} ({detail})" for name, detail in list(mismatched.values())[:5])
                + "; refused rather than handed to the optimizer")
        if mismatched:
            state = {**state, "state": {i: s for i, s in state["state"].items() if i not in mismatched}}
            logger.warning(f"the optimizer state of {', '.join(name for name, _ in mismatched.values())} "
                           "starts afresh: its shape changed with the allowed change")
        self.optimizer.load_state_dict(state)

    def _continue_epoch_at_this_batch_size(self, saved: dict[str, Any]) -> None:
        """Map a checkpoint's progress onto this run's batch size, process count and accumulation.

        The epoch continues after the samples already consumed (not after as many batches
        of the new size), and the schedule continues at the same fraction of training, so
        the learning rate is the one a run at this batch size has at that point.
        """
        state, world, accum = self.state, self.runtime.world_size, self.config.optim.accum_steps
        saved_batch_size = saved.get("config", {}).get("data", {}).get("batch_size", self.config.data.batch_size)
        if "epoch_samples" not in saved:  # written before samples were counted: batches of the saved size
            state.epoch_samples = state.batch * saved_batch_size * world
        before = (saved_batch_size, saved.get("world_size", world), saved.get("config", {}).get("optim", {})
                  .get("accum_steps", accum))
        state.batch = state.epoch_samples // world // self.config.data.batch_size
        self.schedule_offset = state.epoch * self.data.updates_per_epoch + state.batch // accum - state.step
        if before != (self.config.data.batch_size, world, accum):
            logger.info(f"resuming with batch size {self.config.data.batch_size} x {world} processes x {accum} "
                        f"accumulation (the checkpoint had {before[0]} x {before[1]} x {before[2]}): epoch "
                        f"{state.epoch + 1} continues after {state.epoch_samples} samples, and the schedule at "
                        f"update {state.step + self.schedule_offset} of this run's {self.data.updates_per_epoch} "
                        "per epoch")
