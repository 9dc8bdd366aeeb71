"""A run's output folder: every file a run writes is named here, and written only through here.

    OUTPUT_DIR/
        last.pth, best.pth       training checkpoints (`--resume` continues from them)
        metrics.csv, curves.png  one row per epoch, and its plot
        model.safetensors, model_ema.safetensors, config.json
                                 the final model folder (`timm.create_model("local-dir:OUTPUT_DIR")`)
        best/                    the best epoch's model folder, the same three files
        run.lock                 held while a run trains (`vitblocks.train.run_lock`)
        tensorboard/, wandb/, wandb-run-id
                                 experiment tracking (`vitblocks.train.tracking`)

Three rules hold for all of them:

- **Atomic.** Each file is written to a temporary file beside it, synced and renamed
  over it: a crash or a full disk leaves the previous file or none, never part of one.
  A failed write names the file and the space left on its filesystem.
- **Only the run's own files.** A fresh run refuses a folder that holds any of these
  names (naming what it found) unless told `overwrite`, which removes exactly these
  names; other files in the folder are never touched. A resumed run rewrites its own.
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
from vitblocks.train.run_lock import LOCK_NAME, RunLock

__all__ = ["BEST", "BEST_FOLDER", "CHECKPOINTS", "CURVES", "EMA_WEIGHTS", "LAST", "METRICS", "MODEL_CONFIG",
           "MODEL_FILES", "OUTPUTS", "TENSORBOARD", "TRACKING", "WANDB_FOLDER", "WANDB_ID", "WEIGHTS", "RunExistsError", "RunFolder", "RunLinkError", "RunWriteError", "free_space"]

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


class RunExistsError(CheckpointError):
    """The output folder already holds files a run writes, and neither resuming nor overwriting was asked for."""


class RunLinkError(CheckpointError):
    """A name of the run is a symbolic link: writing it would write outside the run's folder."""


class RunWriteError(CheckpointError):
    """A file of the run could not be written (a full disk, no permission); the previous file is intact."""


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

    Example:
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
        found = self.found()
        if not found:
            return
        ways = "Replace them with --overwrite or choose another --output-dir."
        if self.resume_candidate() is not None:
            ways = "Continue the run with --resume auto, replace it with --overwrite, or choose another --output-dir."
        what = "a run" if any(name in found for name in CHECKPOINTS) else "files a run writes"
        raise RunExistsError(f"{self.path} already holds {what} ({', '.join(found)}); starting afresh would "
                             f"replace them. {ways}")

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
        for folder in (self.path, self.path / BEST_FOLDER):
            for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
                stale.unlink(missing_ok=True)

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
    def write(self, name: str, writer: Callable[[str], Any], advice: str = "") -> Path:
        """Write one file of the run atomically.

        Args:
            name: Its name in the folder.
            writer: Called with a temporary path to write the content to.
            advice: What to do after a failed write (default: free space, then `--resume auto`).

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
                + (advice or "Free some space, then run the same command with --resume auto: it writes every "
                              "missing file of the run again from its checkpoint.")) from error
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
        can_resume = self.resume_candidate() is not None
        advice = ("Free some space or choose another --output-dir, then "
                  + ("continue with --resume auto." if can_resume else "start again (--overwrite)."))
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

    def write_curves(self, history: list[dict[str, Any]]) -> Path:
        """Plot a run's loss and accuracy per epoch to `curves.png`.

        Args:
            history: Every epoch's metrics.

        Returns:
            The path written.

        Raises:
            RunWriteError: If it cannot be written.
        """
        from vitblocks.train.report import plot_curves

        advice = ("The run's checkpoints, metrics and weights are written; free some space, then run the same "
                  "command with --resume auto to draw curves.png again.")
        return self.write(CURVES, lambda temporary: plot_curves(history, temporary), advice)

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
                           classes: Iterable[str] = (), best: bool = False) -> list[Path]:
        """Write a model folder (`vitblocks.train.model_folder`): the final one, or `best/`.

        The weights go first and config.json last, so a folder with a config.json always
        has the weights it describes; a file the run no longer writes (EMA weights of an
        earlier run with EMA) is removed.

        Args:
            model: The model.
            config: The run's `TrainConfig`.
            ema: The EMA model, if any.
            classes: Class names in label order (timm's `label_names`).
            best: Write `best/` instead of the folder itself.

        Returns:
            The files written.

        Raises:
            RunWriteError: If a file cannot be written.
        """
        from vitblocks.train.model_folder import model_config_json

        prefix = f"{BEST_FOLDER}/" if best else ""
        if best:
            self.file(BEST_FOLDER).mkdir(exist_ok=True)
        written = [self.write(prefix + WEIGHTS, lambda temporary: save_model_file(model, temporary, WEIGHTS))]
        if ema is not None:
            written.append(self.write(prefix + EMA_WEIGHTS,
                                      lambda temporary: save_model_file(ema, temporary, EMA_WEIGHTS)))
        else:
            self.file(prefix + EMA_WEIGHTS).unlink(missing_ok=True)
        text = model_config_json(model, config, list(classes))
        if text is None:
            self.file(prefix + MODEL_CONFIG).unlink(missing_ok=True)
            return written
        written.append(self.write(prefix + MODEL_CONFIG, lambda temporary: Path(temporary).write_text(text)))
        return written

    def remove_model_folder(self, best: bool = False) -> None:
        """Remove a model folder's files (after a failed write: no folder whose files disagree).

        Args:
            best: `best/` instead of the folder itself.
        """
        prefix = f"{BEST_FOLDER}/" if best else ""
        for name in MODEL_FILES:
            self.file(prefix + name).unlink(missing_ok=True)

    def model_folder_incomplete(self, config: Any, ema: bool, best: bool = False) -> bool:
        """Whether a model folder lacks a file `write_model_folder` writes, or holds an unreadable one.

        Args:
            config: The run's config (a converted model has no config.json).
            ema: Whether the run keeps EMA weights.
            best: `best/` instead of the folder itself.

        Returns:
            True when the folder should be written again.
        """
        from safetensors import safe_open

        folder = self.path / BEST_FOLDER if best else self.path
        if not config.model.convert and not (folder / MODEL_CONFIG).is_file():
            return True
        for name in (WEIGHTS, EMA_WEIGHTS)[: 1 + ema]:
            try:
                with safe_open(str(folder / name), "pt"):
                    pass
            except Exception:  # noqa: BLE001 - missing, truncated or not safetensors: write it again
                return True
        return False

    def curves_missing(self) -> bool:
        """Whether `curves.png` is absent or is not a whole PNG.

        Returns:
            True when it should be drawn again.
        """
        try:
            data = (self.path / CURVES).read_bytes()
        except OSError:
            return True
        return not (data.startswith(b"\x89PNG\r\n\x1a\n") and data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"))

    # ---- resuming --------------------------------------------------------------------------
    def restore_missing(self, model: nn.Module, config: Any, ema: nn.Module | None, classes: list[str],
                        history: list[dict[str, Any]], complete: bool) -> list[str]:
        """Write again what a run of this history should have written but the folder lacks.

        A write that failed (a full disk) or a kill between two writes leaves a file missing,
        empty, truncated or behind its checkpoint; a resumed run writes it again from the
        checkpoint before it trains: `metrics.csv` from the history, `best/` from
        `best.pth`, and for a finished run the final model folder and `curves.png`.

        Args:
            model: The model, holding the checkpoint's weights (`best/` is written from
                `best.pth`'s, which are loaded into it and then put back).
            config: The run's `TrainConfig`.
            ema: The EMA model, if any.
            classes: Class names in label order.
            history: The checkpoint's metrics rows.
            complete: Whether the run has trained all its epochs.

        Returns:
            The names written.

        Raises:
            RunWriteError: If one cannot be written.
        """
        from vitblocks.train.checkpoint import load_training_checkpoint

        written = []
        if history and self.read_metrics_epochs() != [row["epoch"] for row in history]:
            self.write_metrics(history)
            written.append(METRICS)
        if history and (self.path / BEST).is_file() and self.model_folder_incomplete(config, ema is not None, True):
            best = load_training_checkpoint(self.file(BEST))
            current = {name: value.clone() for name, value in model.state_dict().items()}
            current_ema = {name: value.clone() for name, value in ema.state_dict().items()} if ema else None
            try:
                model.load_state_dict(best["model"])
                if ema is not None and best.get("ema"):
                    ema.load_state_dict(best["ema"])
                self.write_model_folder(model, config, ema, best.get("classes") or classes, best=True)
            finally:
                model.load_state_dict(current)
                if ema is not None:
                    ema.load_state_dict(current_ema)
            written.append(f"{BEST_FOLDER}/")
        if complete and self.model_folder_incomplete(config, ema is not None):
            written += [path.name for path in self.write_model_folder(model, config, ema, classes)]
        if complete and history and self.curves_missing():
            self.write_curves(history)
            written.append(CURVES)
        return written
