"""Evaluation: loss and top-1 / top-5 accuracy of a classifier over a loader."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from timm.utils import accuracy as timm_accuracy
from torch import nn

import vitblocks.train.distributed as distributed


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
             runtime: distributed.Runtime | None = None) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (%) of `model` over `loader`.

    Args:
        model: The classifier.
        loader: Batches of (images, labels).
        device: Where to run.
        autocast: Mixed-precision context, if any.
        runtime: When distributed, sums are reduced over all processes.

    Returns:
        `val_loss`, `val_top1` and `val_top5` (%).

    Raises:
        ValueError: If the loader yields no samples.
    """
    model.eval()
    loss, top1, top5, count = 0.0, 0.0, 0.0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast or contextlib.nullcontext():
            logits = model(inputs)
        loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        hits = correct_counts(logits, targets)
        top1, top5, count = top1 + hits[0], top5 + hits[1], count + len(targets)
    if runtime is not None:
        loss, top1, top5, count = distributed.all_sum([loss, top1, top5, count], runtime)
    if not count:
        raise ValueError("the validation set is empty")
    return {"val_loss": loss / count, "val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count}
