"""`Data`: a run's datasets and samplers, and the loaders that bring their batches to the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from vitblocks.train.data.datasets import ResumableSampler
from vitblocks.train.data.feed import Feed
from vitblocks.train.errors import CheckpointError
from vitblocks.train.process.logs import listed

__all__ = ["Data"]


@dataclass
class Data:
    """The datasets and samplers of a run, and the loaders that bring their batches to the device.

    Attributes:
        train_set: Training images (None when only evaluating).
        val_set: Validation images.
        train_sampler: Resumable, distributed sampler of the training set.
        val_sampler: Sampler of the validation set.
        steps_per_epoch: Batches per epoch and process.
        updates_per_epoch: Optimizer steps per epoch.
        classes: Class names in label order (every split uses this one list).
        train_feed: How training batches reach the device (`vitblocks.train.data.feed.feed_for`).
        val_feed: How validation batches reach the device.
    """

    train_set: Dataset | None
    val_set: Dataset
    train_sampler: ResumableSampler | None
    val_sampler: ResumableSampler
    steps_per_epoch: int = 0
    updates_per_epoch: int = 0
    classes: list[str] = field(default_factory=list)
    train_feed: Feed | None = None
    val_feed: Feed | None = None
    _loaders: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def train_loader(self, device: torch.device | str = "cpu") -> Any:
        """The training batches on `device` (`train_feed`), one loader for the run.

        Args:
            device: Where batches go.

        Returns:
            The loader; set the sampler's epoch before each pass.
        """
        return self._loader("train", device)

    def val_loader(self, device: torch.device | str = "cpu") -> Any:
        """The validation batches on `device` (`val_feed`), one loader for the run.

        Args:
            device: Where batches go.

        Returns:
            The loader.
        """
        return self._loader("val", device)

    def _loader(self, split: str, device: torch.device | str) -> Any:
        key = f"{split}:{torch.device(device)}"
        if key not in self._loaders:
            feed = self.train_feed if split == "train" else self.val_feed
            if feed is None:
                raise ValueError(f"this Data has no {split} feed: build it with build_data(config), or give "
                                 f"{split}_feed=Feed(...) (vitblocks.train.data.feed)")
            dataset, sampler = (self.train_set, self.train_sampler) if split == "train" else (self.val_set,
                                                                                           self.val_sampler)
            self._loaders[key] = feed.loader(dataset, sampler, device)
        return self._loaders[key]

    def close(self) -> None:
        """Stop the loaders' worker processes (they live until this, across epochs)."""
        self._loaders.clear()

    def relabel(self, classes: list[str]) -> None:
        """Number the classes by another order of the same names (a checkpoint's, on resume).

        Args:
            classes: The class names in their new label order.

        Raises:
            CheckpointError: For datasets whose labels cannot be renumbered by name.
        """
        index = {name: i for i, name in enumerate(classes)}
        for dataset in (self.train_set, self.val_set):
            if dataset is None:
                continue
            if not hasattr(dataset, "relabel"):
                raise CheckpointError(f"the classes are numbered in another order than the checkpoint's "
                                      f"({listed(classes)}), and {type(dataset).__name__} cannot be renumbered by "
                                      "class name")
            dataset.relabel(index)
        self.classes = list(classes)
        self._loaders.clear()
