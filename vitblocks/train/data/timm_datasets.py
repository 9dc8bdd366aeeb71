"""Datasets that timm's `create_dataset` reads: webdataset shards, Hugging Face and TFDS datasets.

`data.dataset` takes timm's names, prefix and all: `"wds/NAME"` (tar shards with an
`_info.json` in `data.root`, what large and multi-node runs use), `"hfds/NAME"` (a Hugging
Face dataset, map-style), `"hfids/NAME"` (the same, streamed), `"tfds/NAME"`, `"torch/NAME"`.
Their images get the trainer's transforms (uint8 out, normalized on the device).

Resuming mid-epoch:

- **Map-style** (hfds, torch): exact, as for an ImageFolder; the sampler skips the samples
  already trained on, and augmentation draws follow each sample's place in the epoch.
- **Iterable** (wds, hfids, tfds): the epoch's stream is a function of (seed, epoch, loader
  workers, processes): the shard order is drawn from (seed, epoch) and each worker's
  sample shuffle and augmentation from seeds the trainer derives from (seed, epoch). A
  resumed epoch reads its stream again from the start and drops the batches already
  trained on (their files are read and decoded again), so it is exact when the worker
  count, process count and batch size are the ones of the interrupted run; with others
  the epoch continues with as many samples as were left, in another order. The stream is
  always read by at least one worker process, so loading never draws from the main
  process's generators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.data import create_dataset
from torch.utils.data import Dataset, IterableDataset

from vitblocks.train.errors import DataError

_PACKAGES = {"wds": "webdataset", "hfds": "datasets", "hfids": "datasets", "tfds": "tensorflow-datasets"}


class LabelRange:
    """A timm dataset's `target_transform` that refuses a label the classifier has no output for.

    Without it, a label outside `[0, num_classes)` surfaces as a bare IndexError in the loss
    (on a GPU, a device assert), for the validation split only after a training epoch.

    Args:
        name: `data.dataset`, for the message.
        split: The split's name.
        num_classes: `data.num_classes`.
    """

    def __init__(self, name: str, split: str, num_classes: int) -> None:
        self.name, self.split, self.num_classes = name, split, num_classes

    def __call__(self, target: Any) -> Any:
        """Pass a label through, or refuse it.

        Args:
            target: A class index (other targets, such as multi-label lists, pass unchecked).

        Returns:
            The label.

        Raises:
            DataError: For a class index outside `[0, num_classes)`.
        """
        if isinstance(target, int) and not 0 <= target < self.num_classes:
            raise DataError(f"data.dataset={self.name!r} split {self.split!r} holds the label {target}, outside "
                            f"[0, {self.num_classes}) for data.num_classes={self.num_classes}: set data.num_classes "
                            "to the dataset's class count, or fix its labels")
        return target


def build_timm_dataset(name: str, root: str, split: str, train: bool, transform: Any, batch_size: int,
                       seed: int, num_classes: int | None = None) -> Dataset:
    """One split of a timm dataset, with the trainer's transform.

    Args:
        name: `data.dataset`, e.g. "wds/imagenet".
        root: `data.root`: the shards' folder (wds), a cache folder (hfds, tfds).
        split: The split's name in the dataset ("train", "validation", a shard pattern).
        train: Shuffle the stream (iterable datasets).
        transform: Applied to each PIL image (uint8 out).
        batch_size: Batch size per process (iterable datasets round each worker's share to it).
        seed: The run's seed (the shard order of iterable datasets).
        num_classes: Refuse labels outside `[0, num_classes)` as they are read (`LabelRange`).

    Returns:
        The dataset, with `uint8 = True` (normalized later, on the device).

    Raises:
        DataError: If the package a prefix needs is missing, or timm cannot open the split,
            with what timm said and what to check.
    """
    prefix = name.partition("/")[0].lower()
    if prefix == "wds" and not (Path(root) / "_info.json").exists() and not (Path(root) / "info.json").exists() \
            and ".tar" not in split:
        raise DataError(f"data.dataset={name!r} reads webdataset shards, but {root} has no _info.json naming the "
                        f"shards of each split (or give the split as a shard pattern with its sample count, e.g. "
                        f"data.train_split='train-{{000000..000099}}.tar|128000')")
    try:
        dataset = create_dataset(name, root=root, split=split, is_training=train, batch_size=batch_size, seed=seed)
    except ImportError as error:
        raise DataError(f"data.dataset={name!r} needs the {_PACKAGES.get(prefix, prefix)} package ({error}); "
                        f"pip install {_PACKAGES.get(prefix, prefix)}") from None
    except (RuntimeError, AssertionError, ValueError, KeyError, OSError) as error:
        message = " ".join(str(error).split())[:400] or type(error).__name__
        if "install" in message.lower():
            raise DataError(f"data.dataset={name!r}: {message}; pip install {_PACKAGES.get(prefix, prefix)}") from None
        raise DataError(f"data.dataset={name!r} split {split!r} in {root} could not be opened: {message}. Check "
                        "data.root and the split names (data.train_split, data.val_split).") from None
    dataset.transform = transform
    if num_classes is not None:
        dataset.target_transform = LabelRange(name, split, num_classes)
    return dataset


def is_stream(dataset: Any) -> bool:
    """Whether a dataset is read as a stream (no random access): it cannot be sampled by index.

    Args:
        dataset: A dataset.

    Returns:
        True for `IterableDataset`s.
    """
    return isinstance(dataset, IterableDataset)
