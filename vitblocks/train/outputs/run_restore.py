"""What a resumed run writes again: the outputs a failed write or a kill left missing, damaged or behind.

A run writes its checkpoint first and its other outputs after it (metrics, `best/`, and at
the end the final model folder and `curves.png`), so a full disk or a kill between two
writes can leave an output missing, empty, truncated, or describing an earlier point of
the run (`best/` of the previous best epoch, the final folder of a run since extended). On
resume, `restore_missing` compares each output with the checkpoint (the weights files and
`curves.png` record the optimizer step they are of) and writes again, through the
`RunFolder`, whatever does not match, before training goes on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitblocks.io import CheckpointError
from vitblocks.train.outputs.checkpoint import load_training_checkpoint
from vitblocks.train.outputs.run_folder import (
    BEST,
    BEST_FOLDER,
    CONFIG_KEY,
    CURVES,
    EMA_WEIGHTS,
    MODEL_CONFIG,
    STEP_KEY,
    WEIGHTS,
    RunFolder,
)
from vitblocks.train.process.logs import logger

__all__ = ["curves_current", "model_folder_current", "restore_missing"]


def model_folder_current(folder: RunFolder, config: Any, ema: bool, step: int, best: bool = False) -> bool:
    """Whether a model folder holds every file `write_model_folder` writes, readable and of `step`.

    Args:
        folder: The run folder.
        config: The run's config.
        ema: Whether the run keeps EMA weights.
        step: The optimizer step its weights should be of.
        best: `best/` instead of the folder itself.

    Returns:
        False when the folder should be written again.
    """
    from safetensors import safe_open

    path = folder.path / BEST_FOLDER if best else folder.path
    for name in (WEIGHTS, EMA_WEIGHTS)[: 1 + ema]:
        try:
            with safe_open(str(path / name), "pt") as weights:
                stamp = weights.metadata() or {}
        except Exception:  # noqa: BLE001 - missing, truncated or not safetensors: write it again
            return False
        if stamp.get(STEP_KEY) != str(step):
            return False
    return stamp.get(CONFIG_KEY) == "False" or (path / MODEL_CONFIG).is_file()


def curves_current(folder: RunFolder, step: int) -> bool:
    """Whether `curves.png` is a whole PNG drawn at `step`.

    Args:
        folder: The run folder.
        step: The optimizer step the run has reached.

    Returns:
        False when it should be drawn again.
    """
    from PIL import Image

    try:
        with Image.open(folder.path / CURVES) as image:
            image.load()
            return image.text.get(STEP_KEY) == str(step)
    except Exception:  # noqa: BLE001 - missing, truncated or not a PNG: draw it again
        return False


def restore_missing(folder: RunFolder, model: nn.Module, config: Any, ema: nn.Module | None, classes: list[str],
                    history: list[dict[str, Any]], step: int, complete: bool) -> list[str]:
    """Write again what a run at this point should have written but the folder lacks.

    `metrics.csv` from the history; `best/` from `best.pth` (whose weights are loaded into
    the model and then put back); for a finished run, the final model folder and
    `curves.png`. A `best/` that cannot be written only warns, as during training: a
    resume never fails over a copy of `best.pth`.

    Args:
        folder: The run folder.
        model: The model, holding the checkpoint's weights.
        config: The run's `TrainConfig`.
        ema: The EMA model, if any.
        classes: Class names in label order.
        history: The checkpoint's metrics rows.
        step: The checkpoint's optimizer step.
        complete: Whether the run has trained all its epochs.

    Returns:
        The names written (also logged).

    Raises:
        RunWriteError: If `metrics.csv` or a final output cannot be written.
    """
    written = []
    if history and folder.read_metrics_epochs() != [row["epoch"] for row in history]:
        folder.write_metrics(history)
        written.append("metrics.csv")
    if history and (folder.path / BEST).is_file() and _restore_best(folder, model, config, ema, classes):
        written.append(f"{BEST_FOLDER}/")
    if complete and not model_folder_current(folder, config, ema is not None, step):
        written += [path.name for path in folder.write_model_folder(model, config, ema, classes, step=step)]
    if complete and history and not curves_current(folder, step):
        folder.write_curves(history, step)
        written.append(CURVES)
    if written:
        logger.info(f"wrote {', '.join(written)} in {folder.path} again from the checkpoint")
    return written


def _restore_best(folder: RunFolder, model: nn.Module, config: Any, ema: nn.Module | None,
                  classes: list[str]) -> bool:
    """Write `best/` again from `best.pth` when it is not of that checkpoint's step; whether it was written."""
    try:
        best = load_training_checkpoint(folder.file(BEST), mmap=True)  # read lazily: mostly its step is needed
    except (CheckpointError, FileNotFoundError) as error:
        logger.warning(f"{folder.path / BEST_FOLDER} was not checked against {BEST}, which cannot be read ({error})")
        return False
    ema = ema if best.get("ema") else None  # EMA weights only if best.pth's run kept them
    if model_folder_current(folder, config, ema is not None, best["step"], best=True):
        return False
    current = {name: value.clone() for name, value in model.state_dict().items()}
    current_ema = {name: value.clone() for name, value in ema.state_dict().items()} if ema is not None else None
    try:
        model.load_state_dict(best["model"])
        if ema is not None:
            ema.load_state_dict(best["ema"])
    except RuntimeError as error:  # best.pth of another shape (an allowed change of image size, say)
        folder.remove_model_folder(best=True)  # no folder whose files disagree with best.pth
        logger.warning(f"{folder.path / BEST_FOLDER} was not written again: {BEST} does not fit this model "
                       f"({' '.join(str(error).split())[:300]})")
        return False
    try:
        return folder.write_best_folder(model, config, ema, best.get("classes") or classes, best["step"])
    finally:
        model.load_state_dict(current)
        if ema is not None:
            ema.load_state_dict(current_ema)
