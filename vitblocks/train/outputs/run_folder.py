"""A run's output folder: every file a run writes is named here, and written only through here.

    OUTPUT_DIR/
        last.pth, best.pth       training checkpoints (`--resume` continues from them)
        metrics.csv, curves.png  one row per epoch, and its plot
        model.safetensors, model_ema.safetensors, config.json
                                 the final model folder (`timm.create_model("local-dir:OUTPUT_DIR")`)
        best/                    the best epoch's model folder, the same three files
        run.lock                 held while a run trains (`vitblocks.train.outputs.run_lock`)
        tensorboard/, wandb/, wandb-run-id
                                 experiment tracking (`vitblocks.train.run.tracking`)

Three rules hold for all of them:

- **Atomic.** Each file is written to a temporary file beside it, synced and renamed
  over it: a crash or a full disk leaves the previous file or none, never part of one.
  A failed write names the file and the space left on its filesystem.
- **Only the run's own files.** A fresh run refuses a folder that holds any of these
  names but the tracking ones (naming what it found) unless told `overwrite`, which
  removes exactly these names; other files in the folder are never touched. Tracking
  files alone are what a start stopped before its first checkpoint leaves: a fresh run
  removes them and starts clean. A resumed run rewrites its own.
- **Never through a link.** A name of the run that is a symbolic link (a file, or a
  folder such as `best/`) is refused, naming the link, before anything is written: a run
  writes inside its folder and nowhere else. The output folder itself may be a link.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitblocks.io import CheckpointError, replacing, save_model_file
from vitblocks.train.errors import RunExistsError, RunLinkError, RunWriteError
from vitblocks.train.outputs.run_lock import LOCK_NAME, RunLock
from vitblocks.train.process.logs import logger

__all__ = ["BEST", "BEST_FOLDER", "CHECKPOINTS", "CURVES", "EMA_WEIGHTS", "LAST", "METRICS", "MODEL_CONFIG",
           "MODEL_FILES", "OUTPUTS", "TENSORBOARD", "TRACKING", "WANDB_FOLDER", "WANDB_ID", "WEIGHTS", "RunFolder",
           "free_space"]

LAST, BEST = "last.pth", "best.pth"
"""The training checkpoints: the latest state, and the state of the best epoch."""

CHECKPOINTS = (LAST, BEST)
"""The checkpoints a run can continue from, newest first."""

METRICS, CURVES = "metrics.csv", "curves.png"
"""One row of metrics per epoch, and its plot."""

WEIGHTS, EMA_WEIGHTS, MODEL_CONFIG = "model.safetensors", "model_ema.safetensors", "config.json"
MODEL_FILES = (WEIGHTS, EMA_WEIGHTS, MODEL_CONFIG)
"""What a model folder holds."""

BEST_FOLDER = "best"
"""The model folder of a run's best epoch, inside its output folder."""

TENSORBOARD, WANDB_FOLDER, WANDB_ID = "tensorboard", "wandb", "wandb-run-id"
TRACKING = (TENSORBOARD, WANDB_FOLDER, WANDB_ID)
"""What experiment tracking writes: TensorBoard's event files, wandb's folder and the wandb run id."""

OUTPUTS = (*CHECKPOINTS, METRICS, CURVES, *MODEL_FILES, BEST_FOLDER, *TRACKING)
"""Every name a run writes in its folder besides its lock."""

STEP_KEY = "vitblocks_step"
"""The metadata key of weights files and `curves.png` holding the optimizer step they are of."""

CONFIG_KEY = "vitblocks_config_json"
"""The metadata key of weights files saying whether a config.json goes with them ("True" or "False")."""


def free_space(folder: str | os.PathLike) -> str:
    """The space left on a folder's filesystem, for messages.

    Args:
        folder: A folder (or a file in it).

    Returns:
        E.g. "1.2 GB free", or "free space unknown".
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return "free space unknown"  # not reached


class RunFolder:
    """The files of one training run (see the module's rules).

    Args:
        path: The output folder.

    Examples:
        >>> import tempfile
        >>> folder = RunFolder(tempfile.mkdtemp())
        >>> folder.write_metrics([{"epoch": 1, "val_top1": 50.0}])
        >>> folder.found(), folder.read_metrics_epochs()
        (['metrics.csv'], [1])
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # ---- names ----------------------------------------------------------------------
    def file(self, name: str) -> Path:
        """The path of one of the run's names, refused if it or a folder on the way is a link.

        Args:
            name: A name relative to the folder, e.g. "last.pth" or "best/config.json".

        Returns:
            The path.

        Raises:
            RunLinkError: Naming the link and where it points.
        """
        path = self.path
        for part in Path(name).parts:
            path = path / part
            if path.is_symlink():
                raise RunLinkError(
                    f"{path} is a symbolic link (to {os.readlink(path)}); a run writes only its own files, inside "
                    f"{self.path}, never through a link. Remove the link, or choose another --output-dir.")
        return path

    def tensorboard_folder(self) -> Path:
        """Where TensorBoard's event files go (`tensorboard/`), refused if it is a link.

        Returns:
            The folder's path.
        """
        return self.file(TENSORBOARD)

    def found(self) -> list[str]:
        """The run's names that exist in the folder (its lock aside).

        Returns:
            The names, in `OUTPUTS` order.
        """
        return [name for name in OUTPUTS if os.path.lexists(self.path / name)]

    def resume_candidate(self) -> Path | None:
        """The checkpoint `--resume auto` continues from: `last.pth`, else `best.pth` (when writing
        `last.pth` failed after `best.pth` was written, say on a full disk).

        Returns:
            The path, or None when the folder holds neither.
        """
        for name in CHECKPOINTS:
            if (self.path / name).is_file():
                return self.file(name)
        return None

    # ---- starting --------------------------------------------------------------------
    def refuse_fresh_start(self) -> None:
        """Refuse to start a fresh run in a folder that holds files a run writes.

        Raises:
            RunExistsError: Naming the files found and the ways on.
        """
        found = [name for name in self.found() if name not in TRACKING]  # tracking alone: an attempt that never
        if not found:                                                       # reached a checkpoint; it starts afresh
            return
        ways = "Replace them with --overwrite or choose another --output-dir."
        if self.resume_candidate() is not None:
            ways = "Continue the run with --resume auto, replace it with --overwrite, or choose another --output-dir."
        what = "a run" if any(name in found for name in CHECKPOINTS) else "files a run writes"
        raise RunExistsError(f"{self.path} already holds {what} ({', '.join(found)}); starting afresh would "
                             f"replace them. {ways}")

    def start(self, resumed: bool, overwrite: bool) -> None:
        """Make the folder ready for a run.

        Args:
            resumed: The run continues from a checkpoint (its files are its own).
            overwrite: A fresh run replaces the run found there (`clear`); without it, a
                fresh run refuses a folder holding a run's files (`refuse_fresh_start`).

        Raises:
            RunExistsError: For a fresh run in a folder that holds a run's files.
            RunLinkError: For a name of the run that is a link.
        """
        if not resumed and overwrite:
            self.clear()
            return
        if not resumed:
            self.refuse_fresh_start()
            self._clear_tracking_leftovers()
        self.prepare()

    def _clear_tracking_leftovers(self) -> None:
        """Remove what an earlier start that wrote no checkpoint logged, so that a fresh run's curves
        are not drawn over it (wandb's own folder stays: it may hold runs still to upload)."""
        left = [name for name in (TENSORBOARD, WANDB_ID) if os.path.lexists(self.file(name))]
        for name in left:
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)
            else:
                (self.path / name).unlink()
        if left:
            logger.info(f"removed {', '.join(left)} from {self.path}: "
                        "left by an earlier start that wrote no checkpoint")

    def prepare(self) -> None:
        """Create the folder, check that none of the run's names is a link, and remove the
        temporary files of a write that was killed.

        Raises:
            CheckpointError: If the folder cannot be created (a file in the way, no permission).
            RunLinkError: For a name of the run that is a link.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointError(f"cannot create the output folder {self.path}: {error.strerror or error}; "
                                  "choose another --output-dir") from None
        for name in (*OUTPUTS, LOCK_NAME, *(f"{BEST_FOLDER}/{file}" for file in MODEL_FILES)):
            self.file(name)
        for name in (*OUTPUTS, *(f"{BEST_FOLDER}/{file}" for file in MODEL_FILES)):
            path = self.path / name
            for stale in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
                stale.unlink(missing_ok=True)  # what `replacing` leaves when the process is killed mid-write

    def clear(self) -> None:
        """Remove every name of the run (`--overwrite`), and nothing else.

        Raises:
            RunLinkError: For a name of the run that is a link (checked before anything is removed).
        """
        self.prepare()
        for name in self.found():
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def lock(self) -> RunLock:
        """The folder's run lock (not yet taken).

        Returns:
            The lock.

        Raises:
            RunLinkError: If `run.lock` is a link.
        """
        self.file(LOCK_NAME)
        return RunLock(self.path)

    # ---- writing -------------------------------------------------------------------------
    def write(self, name: str, writer: Callable[[str], Any], advice: Callable[[], str] | None = None) -> Path:
        """Write one file of the run atomically.

        Args:
            name: Its name in the folder.
            writer: Called with a temporary path to write the content to.
            advice: Says what to do after a failed write, asked only then (default: free space,
                then `--resume auto`).

        Returns:
            The path written.

        Raises:
            RunLinkError: If the name is a link.
            RunWriteError: Naming the file, the reason and the space left, if the write fails.
        """
        path = self.file(name)
        try:
            with replacing(path) as temporary:
                writer(temporary)
        except (OSError, RuntimeError) as error:  # a full disk reaches torch.save as a RuntimeError
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            raise RunWriteError(
                f"could not write {path} ({reason}); {kept}, {free_space(path.parent)} on its filesystem. "
                + (advice() if advice else "Free some space, then run the same command with --resume auto: it writes "
                                           "every missing file of the run again from its checkpoint.")) from error
        return path

    def write_checkpoint(self, state: dict[str, Any], name: str = LAST) -> Path:
        """Write a training checkpoint.

        Args:
            state: What `torch.save` stores.
            name: LAST or BEST.

        Returns:
            The path written.

        Raises:
            RunWriteError: If it cannot be written (the previous checkpoint is intact).
        """
        def advice() -> str:
            return "Free some space, then " + ("continue with --resume auto." if self.resume_candidate() else
                                               "start again with --overwrite.")

        return self.write(name, lambda temporary: torch.save(state, temporary), advice)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite `metrics.csv` from a run's whole history (one row per epoch).

        Args:
            history: Every epoch's metrics so far (nothing is written for none).

        Raises:
            RunWriteError: If it cannot be written.
        """
        if not history:
            return
        columns = list(dict.fromkeys(key for row in history for key in row))  # rows of older runs lack new ones
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(history)
        self.write(METRICS, lambda temporary: Path(temporary).write_text(text.getvalue()))

    def read_metrics_epochs(self) -> list[int] | None:
        """The epochs `metrics.csv` holds rows for.

        Returns:
            The epoch numbers, or None when the file is missing, empty or unreadable.
        """
        try:
            with open(self.path / METRICS, newline="") as handle:
                epochs = [int(row["epoch"]) for row in csv.DictReader(handle)]
        except (OSError, KeyError, ValueError, TypeError, csv.Error):
            return None
        return epochs or None

    def write_curves(self, history: list[dict[str, Any]], step: int | None = None) -> Path:
        """Plot a run's loss and accuracy per epoch to `curves.png`.

        Args:
            history: Every epoch's metrics.
            step: The optimizer step the history reaches, stored in the PNG (`STEP_KEY`).

        Returns:
            The path written.

        Raises:
            RunWriteError: If it cannot be written.
        """
        from vitblocks.train.outputs.report import plot_curves

        def advice() -> str:
            return ("The run's checkpoints, metrics and weights are written; free some space, then run the same "
                    "command with --resume auto to draw curves.png again.")

        stamp = {STEP_KEY: str(step)} if step is not None else None
        return self.write(CURVES, lambda temporary: plot_curves(history, temporary, stamp), advice)

    def write_text(self, name: str, text: str) -> Path:
        """Write a small text file of the run (the wandb run id).

        Args:
            name: Its name.
            text: Its content.

        Returns:
            The path written.
        """
        return self.write(name, lambda temporary: Path(temporary).write_text(text))

    def write_model_folder(self, model: nn.Module, config: Any, ema: nn.Module | None = None,
                           classes: Iterable[str] = (), best: bool = False, step: int | None = None) -> list[Path]:
        """Write a model folder (`vitblocks.train.outputs.model_folder`): the final one, or `best/`.

        The weights go first and config.json last, so a folder with a config.json always
        has the weights it describes; a file the run no longer writes (EMA weights of an
        earlier run with EMA) is removed. The weights files record the optimizer step they
        are of and whether a config.json goes with them (`STEP_KEY`, `CONFIG_KEY`), so a
        resume can tell a folder left behind by an earlier point of the run
        (`vitblocks.train.outputs.run_restore.model_folder_current`).

        Args:
            model: The model.
            config: The run's `TrainConfig`.
            ema: The EMA model, if any.
            classes: Class names in label order (timm's `label_names`).
            best: Write `best/` instead of the folder itself.
            step: The optimizer step the weights are of (None: not recorded).

        Returns:
            The files written.

        Raises:
            RunWriteError: If a file cannot be written.
        """
        from vitblocks.train.outputs.model_folder import model_config_json

        prefix = f"{BEST_FOLDER}/" if best else ""
        if best:
            self.file(BEST_FOLDER).mkdir(exist_ok=True)
        text = model_config_json(model, config, list(classes))  # None: timm cannot describe this model
        stamp = {STEP_KEY: str(step), CONFIG_KEY: str(text is not None)} if step is not None else None
        written = [self.write(prefix + WEIGHTS, lambda temporary: save_model_file(model, temporary, WEIGHTS, stamp))]
        if ema is not None:
            written.append(self.write(prefix + EMA_WEIGHTS,
                                      lambda temporary: save_model_file(ema, temporary, EMA_WEIGHTS, stamp)))
        else:
            self.file(prefix + EMA_WEIGHTS).unlink(missing_ok=True)
        if text is None:
            self.file(prefix + MODEL_CONFIG).unlink(missing_ok=True)
            return written
        written.append(self.write(prefix + MODEL_CONFIG, lambda temporary: Path(temporary).write_text(text)))
        return written

    def write_best_folder(self, model: nn.Module, config: Any, ema: nn.Module | None, classes: Iterable[str],
                          step: int) -> bool:
        """Write `best/`, a copy of `best.pth`'s weights: a failure removes what it wrote and only warns.

        Args:
            model: The model, holding the best epoch's weights.
            config: The run's `TrainConfig`.
            ema: The EMA model, if any.
            classes: Class names in label order.
            step: The optimizer step of `best.pth`.

        Returns:
            Whether the folder was written.
        """
        try:
            self.write_model_folder(model, config, ema, classes, best=True, step=step)
        # RunWriteError: a full disk or no permission; RuntimeError: torch failing to hand over the weights
        except (RunWriteError, RuntimeError) as error:
            self.remove_model_folder(best=True)  # no folder whose files disagree
            logger.warning(f"could not write the model folder {self.path / BEST_FOLDER} "
                           f"({' '.join(str(error).split())[:300]}); {BEST} holds the same weights")
            return False
        return True

    def summary_files(self, written: list[Path]) -> dict[str, Path | str]:
        """What a finished run's summary lists: label -> where it is.

        Args:
            written: The final files just written (model folder, curves).

        Returns:
            Checkpoints (best.pth when written, and last.pth), metrics, weights, the timm
            model folder (when it has a config.json), EMA weights (when written) and curves.
        """
        names = {path.name for path in written}
        checkpoints = f"{self.path / LAST} (last epoch)"
        if (self.path / BEST).is_file():
            checkpoints = f"{self.path / BEST} (best top-1), {checkpoints}"
        files: dict[str, Path | str] = {"checkpoints": checkpoints, "metrics": self.path / METRICS,
                                        "weights": self.path / WEIGHTS}
        if MODEL_CONFIG in names:
            files["timm model"] = f"timm.create_model('local-dir:{self.path}', pretrained=True)"
        if EMA_WEIGHTS in names:
            files["EMA weights"] = self.path / EMA_WEIGHTS
        if CURVES in names:
            files["curves"] = self.path / CURVES
        return files

    def remove_model_folder(self, best: bool = False) -> None:
        """Remove a model folder's files (after a failed write: no folder whose files disagree).

        Args:
            best: `best/` instead of the folder itself.
        """
        prefix = f"{BEST_FOLDER}/" if best else ""
        for name in MODEL_FILES:
            self.file(prefix + name).unlink(missing_ok=True)
