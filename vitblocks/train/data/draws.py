"""Augmentation draws that belong to a sample's place in an epoch, not to a worker process.

A training sampler yields `(index, key)` pairs; `SeededDraws` seeds Python's, NumPy's and
torch's generators from the key before the dataset transforms the sample. An image's
crop, flip and RandAugment draws are then a function of (seed, epoch, position in the
epoch), whichever worker loads it and however many workers there are, so a run resumed
mid-epoch sees exactly the augmented images an uninterrupted one would, and workers can
stay alive across epochs (`persistent_workers`) without carrying their random streams.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info


def draw_key(seed: int, epoch: int, position: int) -> int:
    """The key of one sample's augmentation draws.

    Args:
        seed: The run's seed.
        epoch: Epoch index.
        position: Place in the epoch's full order (before any skip or split by process).

    Returns:
        A distinct integer for each (seed, epoch, position).
    """
    return ((seed * 1_000_003) + epoch) * 2**40 + position


class SeededDraws(Dataset):
    """A dataset whose transform draws from generators seeded by each sample's key.

    Indexed by `(index, key)` pairs (a sampler with `draws=True`) or by plain indices
    (then the generators are left as they are). In the main process (`workers=0`) the
    generators' states are restored afterwards, so loading never shifts the draws of
    mixup, dropout or random erasing there.

    Args:
        dataset: The map-style dataset to load from.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, key = item
        if get_worker_info() is not None:  # a worker's generators serve only its samples
            seed_draws(key)
            return self.dataset[index]
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            seed_draws(key)
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


def seed_draws(key: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU) generators for the sample of one key.

    Args:
        key: From `draw_key`.
    """
    streams = random.Random(key)
    random.seed(streams.getrandbits(64))
    np.random.seed(streams.getrandbits(32))
    torch.manual_seed(streams.getrandbits(63))
