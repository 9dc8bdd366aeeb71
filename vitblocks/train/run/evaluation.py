"""Evaluation: loss and top-1 / top-5 accuracy of a classifier over a loader."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from timm.utils import accuracy as timm_accuracy
from torch import nn

import vitblocks.train.process.distributed as distributed
from vitblocks.train.errors import DataError
from vitblocks.train.process.preemption import loader_failure, raise_loader_failure


def correct_counts(logits: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """Top-1 and top-5 correct predictions in a batch, by `timm.utils.accuracy`.

    Counts rather than timm's percentages, so batches of any size (and processes) sum
    exactly; top-5 is top-k for tasks with fewer than 5 classes.

    Args:
        logits: (B, classes).
        targets: (B,) class indices.

    Returns:
        The two counts.
    """
    topk = (1, min(5, logits.shape[-1]))
    return [round(percent.item() * len(targets) / 100) for percent in timm_accuracy(logits, targets, topk=topk)]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             autocast: contextlib.AbstractContextManager | None = None,
             runtime: distributed.Runtime | None = None, max_unreadable: int | None = None) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (%) of `model` over `loader`.

    Validation substitutes nothing: an image that cannot be read comes with a negative
    label (`vitblocks.train.data.image_folder.UNREADABLE`), is named by the dataset, counted
    here and left out of the scores, so a class whose images cannot be read is never
    scored as some other class's images.

    Args:
        model: The classifier.
        loader: Batches of (images, labels).
        device: Where to run.
        autocast: Mixed-precision context, if any.
        runtime: When distributed, sums are reduced over all processes (and so are
            failures: every process raises the same).
        max_unreadable: Unreadable images tolerated (over all processes) before the
            evaluation stops (None: no limit).

    Returns:
        `val_loss`, `val_top1` and `val_top5` (%), and `val_unreadable` (the count) when
        some images could not be read.

    Raises:
        DataError: If the loader yields no readable sample, its dataset stops on its data
            (a label out of range), or more than `max_unreadable` images could not be read.
        LoaderWorkerDied: If a loader worker died (on any process, when distributed).
    """
    model.eval()
    loss, top1, top5, count, unreadable, error = 0.0, 0.0, 0.0, 0, 0, None
    try:
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast or contextlib.nullcontext():
                logits = model(inputs)
            readable = targets >= 0
            skipped = len(targets) - int(readable.sum())
            if skipped:
                logits, targets, unreadable = logits[readable], targets[readable], unreadable + skipped
            if not len(targets):
                continue
            loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            hits = correct_counts(logits, targets)
            top1, top5, count = top1 + hits[0], top5 + hits[1], count + len(targets)
    except (DataError, RuntimeError) as failed:  # every process learns of it below
        error = loader_failure(failed)
        if error is None:
            raise
    if runtime is not None:
        loss, top1, top5, count, unreadable = distributed.all_sum([loss, top1, top5, count, unreadable], runtime)
    raise_loader_failure(error, runtime)
    if max_unreadable is not None and unreadable > max_unreadable:
        raise DataError(f"{int(unreadable)} validation images cannot be read (named above), more than "
                        f"data.max_bad_images={max_unreadable}; the evaluation stopped rather than score what is "
                        "left. Replace or remove them, or raise data.max_bad_images.")
    if not count:
        raise DataError("the validation set holds no image to score" + (
            f": none of its {int(unreadable)} images can be read" if unreadable else ""))
    scores = {"val_loss": loss / count, "val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count}
    if unreadable:
        scores["val_unreadable"] = int(unreadable)
    return scores


def read_labels(loader: Iterable, runtime: distributed.Runtime | None = None,
                stop: Callable[[], bool] | None = None) -> int | None:
    """Read a loader's batches once, for the checks its dataset makes as it reads (labels in range).

    Args:
        loader: Batches of (images, labels).
        runtime: When distributed, every process learns of a failure on any of them.
        stop: Asked after each batch; True ends the reading early.

    Returns:
        The labels read by this process, or None when `stop` ended the reading.

    Raises:
        DataError: From the dataset's checks (on any process).
        LoaderWorkerDied: If a loader worker died (on any process).
    """
    count, error, stopped = 0, None, False
    try:
        for _, targets in loader:
            count += len(targets)
            if stop is not None and stop():
                stopped = True
                break
    except (DataError, RuntimeError) as failed:
        error = loader_failure(failed)
        if error is None:
            raise
    raise_loader_failure(error, runtime)
    return None if stopped else count
