"""The datasets of a config, their transforms, and the resumable sampler that orders them.

How their batches reach the device is `vitblocks.train.data.feed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import create_transform
from torch.utils.data import Dataset, Sampler, TensorDataset

from vitblocks.train.config.names import is_timm_dataset
from vitblocks.train.config.schema import DataConfig, TrainConfig
from vitblocks.train.data.draws import draw_key
from vitblocks.train.data.image_folder import (
    FolderScan,
    ImageFiles,
    class_folders,
    holds_images,
    load_image,
    scan_split,
)
from vitblocks.train.data.timm_datasets import build_timm_dataset
from vitblocks.train.errors import DataError, FolderError
from vitblocks.train.process.extras import import_train_extra
from vitblocks.train.process.logs import listed, logger

_TRAINER_ADVICE = ("Point the recipe at your copy with --set data.root=/path/to/imagenet, check the recipe first "
                   "with --smoke (synthetic data), or try the offline quickstart: "
                   "python -m vitblocks.train recipes/quickstart.py")


SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "validation", "valid", "eval", "evaluation")}
"""The folder names each ImageFolder split is found under, in order: timm's scripts' names too."""


def split_folder(root: str | Path, split: str) -> Path:
    """The folder of a split: the first of its names (`SPLIT_NAMES`) that exists under `root`.

    Args:
        root: Dataset root.
        split: "train" or "val".

    Returns:
        E.g. `root/validation` for a tree made for timm's scripts; `root/<split>` when
        none exists.

    Examples:
        >>> split_folder("/nowhere", "val").name
        'val'
    """
    root = Path(root)
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return root / split


def _layout_help(root: Path, split: str) -> str:
    folder = split_folder(root, split)
    missing = folder  # name the first folder that is missing, not the split under it
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    return (
        f"expected an ImageFolder tree at {root}:\n"
        f"    {root}/train/<class name>/<image>.jpg\n"
        f"    {root}/val/<class name>/<image>.jpg   (or validation/, valid/, eval/ as timm's scripts name it)\n"
        f"but {missing if not folder.exists() else folder} "
        f"{'does not exist' if not folder.exists() else 'holds no images in class folders'}."
    )


def check_image_folder(root: Path, split: str) -> None:
    """Check that a split folder holds class folders with images.

    Args:
        root: Dataset root.
        split: "train" or "val".

    Raises:
        DataError: Explaining the expected layout and what to do.
    """
    if not folder_classes(split_folder(root, split)):
        raise DataError(_layout_help(root, split), _TRAINER_ADVICE)


def folder_classes(folder: Path) -> list[str]:
    """The class names of an ImageFolder split: its subfolders that hold images, sorted.

    Images count by `vitblocks.train.data.image_folder`'s rule, nested subfolders included.

    Args:
        folder: A split folder, e.g. `root/train`.

    Returns:
        The names.

    Raises:
        DataError: If a folder of the tree cannot be listed.
    """
    if not folder.is_dir():
        return []
    try:
        return [d.name for d in class_folders(folder) if holds_images(d)]
    except FolderError as error:
        raise DataError(str(error)) from None


def empty_class_folders(folder: Path) -> list[str]:
    """Subfolders of a split folder that hold no image (not counted as classes).

    Args:
        folder: A split folder.

    Returns:
        Their names.
    """
    try:
        return [d.name for d in class_folders(folder) if not holds_images(d)] if folder.is_dir() else []
    except FolderError:
        return []


def dataset_classes(config: TrainConfig) -> list[str]:
    """The class names of a config's dataset, in label order: one list for every split.

    An ImageFolder dataset takes its classes from `train/` (from `val/` when there is no
    `train/`, as when only evaluating); the digits are "0".."9"; synthetic classes are
    numbered.

    Args:
        config: The experiment.

    Returns:
        Class names; label i is `names[i]`.

    Raises:
        DataError: If the folder's class count differs from `data.num_classes`.
    """
    data = config.data
    if data.dataset == "digits":
        names = [str(i) for i in range(10)]
    elif data.dataset == "synthetic" or is_timm_dataset(data.dataset):  # timm's datasets label by index
        return [str(i) for i in range(data.num_classes)]
    else:
        root = Path(data.root)
        names = folder_classes(split_folder(root, "train")) or folder_classes(split_folder(root, "val"))
        if not names:
            return []  # the layout check explains what is missing
    if len(names) != data.num_classes:
        where = "scikit-learn's digits" if data.dataset == "digits" else f"{split_folder(data.root, 'train')}"
        shown = listed(names, 8)
        empty = empty_class_folders(split_folder(data.root, "train")) if data.dataset == "imagefolder" else []
        uncounted = f"; not counted, as they hold no images: {', '.join(empty[:8])}" if empty else ""
        raise DataError(f"data.num_classes={data.num_classes} but {where} has {len(names)} classes ({shown}"
                        f"{uncounted}); set data.num_classes={len(names)}")
    return names


SAMPLE_FORMS = ("tensors", "uint8", "bytes")
"""What a dataset gives per sample: model-ready tensors held in memory (the digits, synthetic
images), uint8 images decoded by loader workers (image folders with `data.decode="cpu"`, timm's
datasets), or the files' bytes, decoded on the device (`data.decode="gpu"`)."""


def sample_form(config: TrainConfig) -> str:
    """What the datasets of a config give per sample, decided by the config alone (one of `SAMPLE_FORMS`).

    `build_dataset` builds the datasets so, and `vitblocks.train.data.feed.feed_for` the way
    their batches reach the device.

    Args:
        config: The experiment.

    Returns:
        "tensors", "uint8" or "bytes".

    Examples:
        >>> from vitblocks.train import DataConfig, TrainConfig
        >>> sample_form(TrainConfig(data=DataConfig(dataset="imagefolder", root="data")))
        'uint8'
    """
    data = config.data
    if data.dataset in ("digits", "synthetic"):
        return "tensors"
    if data.dataset == "imagefolder" and data.decode == "gpu":
        return "bytes"
    return "uint8"


def dataset_length(dataset: Dataset | None) -> int | None:
    """A dataset's sample count.

    Args:
        dataset: A dataset, or None.

    Returns:
        Its length; None for no dataset or a stream that does not know its length.
    """
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _digits(config: DataConfig, train: bool, seed: int) -> Dataset:
    digits = import_train_extra("sklearn.datasets").load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=config.img_size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean, std = torch.tensor(config.mean).view(1, 3, 1, 1), torch.tensor(config.std).view(1, 3, 1, 1)
    images = (images - mean) / std
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    num_val = int(round(len(labels) * config.val_fraction))
    chosen = order[num_val:] if train else order[:num_val]
    return TensorDataset(images[chosen], labels[chosen])


def _synthetic(config: DataConfig, train: bool, seed: int, device: torch.device | str = "cpu") -> Dataset:
    """Random images whose mean brightness per channel encodes the label (learnable), made on `device`."""
    count = config.synthetic_samples if train else max(config.synthetic_samples // 4, config.batch_size)
    gen = torch.Generator(device).manual_seed(seed + (0 if train else 1))
    labels = torch.randint(0, config.num_classes, (count,), generator=gen, device=device)
    images = torch.randn(count, 3, config.img_size, config.img_size, generator=gen, device=device)
    images += (labels.float() / max(config.num_classes - 1, 1) - 0.5).view(-1, 1, 1, 1) * 2
    return TensorDataset(images, labels)


def build_dataset(config: TrainConfig, train: bool, classes: list[str] | None = None,
                  device: torch.device | str = "cpu") -> Dataset:
    """The training or validation dataset of a config.

    Both splits of an ImageFolder dataset number their classes by one list (the train
    split's), so a class missing from `val/` cannot shift the labels of the others.

    Args:
        config: The experiment.
        train: Training split (with augmentation) or validation split.
        classes: The class list (default: `dataset_classes(config)`).
        device: Where synthetic images are made (they stay there for the run).

    Returns:
        The dataset.

    Raises:
        DataError: For an imagefolder root without the expected layout, a class count
            that differs from `data.num_classes`, or a val class that train lacks.
    """
    data = config.data
    if data.dataset == "digits":
        return _digits(data, train, config.seed)
    if data.dataset == "synthetic":
        return _synthetic(data, train, config.seed, device)
    if is_timm_dataset(data.dataset):
        return build_timm_dataset(data.dataset, data.root, data.train_split if train else data.val_split, train,
                                  train_transform(config) if train else eval_transform(data, uint8=True),
                                  data.batch_size, config.seed, data.num_classes)
    root, split = Path(data.root), "train" if train else "val"
    check_image_folder(root, split)
    folder = split_folder(root, split)
    if folder.name != split:
        logger.info(f"{root}: the {split} split is {folder.name}/")
    classes = classes if classes is not None else dataset_classes(config)
    unknown = sorted(set(folder_classes(folder)) - set(classes))
    if unknown:
        raise DataError(f"{folder} has classes that the training classes lack: {', '.join(unknown[:8])}; "
                        f"every {folder.name}/ class folder must also be in the training split (labels follow its "
                        "class list)")
    gpu_decode = sample_form(config) == "bytes"
    transform = None if gpu_decode else train_transform(config) if train else eval_transform(data, uint8=True)
    try:
        scan = scan_split(folder)
    except FolderError as error:
        raise DataError(str(error)) from None
    report_scan(folder, scan)
    check_images_open(scan, folder)
    return ImageFiles(folder, {name: i for i, name in enumerate(classes)}, transform,
                      max_bad_images=data.max_bad_images, scan=scan, uint8=not gpu_decode, read_bytes=gpu_decode,
                      substitute=train)


def report_scan(folder: Path, scan: FolderScan) -> None:
    """Name what a split's scan left out: empty class folders and folders reached twice (link loops).

    Args:
        folder: The split folder.
        scan: Its scan.
    """
    if scan.empty:
        logger.warning(f"{folder}: class folders without images, not counted as classes: "
                       f"{', '.join(scan.empty[:10])}{' ...' if len(scan.empty) > 10 else ''}")
    if scan.loops:
        logger.warning(f"{folder}: skipped folders reached a second time through links (a loop or a duplicate): "
                       f"{', '.join(scan.loops[:5])}{' ...' if len(scan.loops) > 5 else ''}")


def check_images_open(scan: FolderScan, folder: Path, tries: int = 3) -> None:
    """Decode images of each class until one works, so unreadable data fails before training.

    Up to `tries` images per class are decoded; the undecodable ones are named (they
    are skipped when loading). The run is refused only when no tried image decodes.

    Args:
        scan: The split's scan.
        folder: The split folder, for messages.
        tries: Images tried per class at most.

    Raises:
        DataError: If none of the tried images decodes, naming them and why.
    """
    bad: list[str] = []
    good = 0
    start = 0
    for count in scan.counts.values():
        for path in scan.files[start : start + min(count, tries)]:
            try:
                load_image(path)
                good += 1
                break
            except Exception as error:  # noqa: BLE001 - PIL raises many types for unreadable files
                bad.append(f"{path} ({type(error).__name__}: {' '.join(str(error).split())[:120]})")
        start += count
    shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    if bad and not good:
        raise DataError(f"no image in {folder} could be read; tried: {shown}. Check that the files are images "
                        "(not empty, truncated, or of another format).")
    if bad:
        logger.warning(f"{folder}: {len(bad)} images cannot be decoded and will be skipped: {shown}")


def train_transform(config: TrainConfig) -> Callable:
    """Training transform of decoded images: timm's random-resized crop, flip, RandAugment or
    color jitter, to uint8 (C, H, W); normalizing and random erasing run on the device
    (`vitblocks.train.data.feed`).

    Args:
        config: Image size, interpolation and the augmentation.

    Returns:
        A torchvision transform.
    """
    data, aug = config.data, config.augment
    transform = create_transform(
        data.img_size, is_training=True, auto_augment=aug.auto_augment, color_jitter=aug.color_jitter,
        hflip=aug.hflip, scale=aug.scale, interpolation=data.interpolation, mean=data.mean, std=data.std,
        use_prefetcher=True,
    )
    return with_safe_posterize(transform)


def with_safe_posterize(transform: Callable) -> Callable:
    """A timm training transform whose RandAugment / AutoAugment posterize keeps working with Pillow 13.

    Args:
        transform: From `timm.data.create_transform` (changed in place).

    Returns:
        The same transform, its posterize operations using `posterize_keeping_no_bits`.
    """
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):  # RandAugment / AutoAugment operations
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_keeping_no_bits
    return transform


def posterize_keeping_no_bits(image: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, also for 0 bits kept (a black image), which Pillow 13 refuses.

    At the top of its magnitude range timm's posterize asks to keep 0 bits (the DeiT
    policy "rand-m9-mstd0.5-inc1" draws it for about 1 in 600 images); Pillow before 13
    gave a black image and Pillow 13 raises ValueError, which stopped the worker and the run.

    Args:
        image: A PIL image.
        bits_to_keep: Most significant bits kept per channel (8 or more: unchanged).

    Returns:
        The posterized image.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def eval_transform(data: DataConfig, uint8: bool = False) -> Callable:
    """Evaluation transform: resize to img_size / crop_pct, center-crop img_size, normalize.

    Args:
        data: Image size, crop fraction, interpolation and normalization.
        uint8: Stop before normalizing: uint8 (C, H, W) tensors, normalized later on the
            device (`vitblocks.train.data.feed`).

    Returns:
        A torchvision transform.
    """
    return create_transform(
        data.img_size, is_training=False, crop_pct=data.crop_pct, interpolation=data.interpolation,
        mean=data.mean, std=data.std, use_prefetcher=uint8,
    )


class ResumableSampler(Sampler):
    """Epoch-seeded sample order that can start part-way through an epoch.

    Each rank takes every `world_size`-th index of a permutation that depends only on
    (seed, epoch), so an interrupted run resumes on exactly the batches it had not seen.
    With `repeats` > 1 every index appears that many times (repeated augmentation) and
    the epoch keeps its length by taking the first len(dataset) of them.

    Args:
        length: Dataset size.
        shuffle: Permute (training) or keep order (validation).
        seed: Base seed.
        rank: This process's rank.
        world_size: Number of processes.
        repeats: Repetitions of each index per epoch.
        draws: Yield `(index, key)` pairs, the key naming the sample's place in the
            epoch (`vitblocks.train.data.draws`), for datasets wrapped in `SeededDraws`.
    """

    def __init__(self, length: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 repeats: int = 1, draws: bool = False) -> None:
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size, self.repeats, self.draws = rank, world_size, repeats, draws
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch and where in it to start.

        Args:
            epoch: Epoch index (selects the order).
            skip: Samples of the epoch's order already consumed, by all processes
                together (before an interruption, at whatever batch size or process
                count that run had).
        """
        self.epoch, self.skip = epoch, skip

    def _order(self) -> torch.Tensor:
        """(2, N): this process's indices and their places in the epoch's full order."""
        if self.shuffle:
            order = torch.randperm(self.length,
                                   generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.length)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)[: self.length]
        order = torch.stack([order, torch.arange(len(order))])
        if self.shuffle and self.world_size > 1:  # equal shares, so every rank runs the same number of steps
            order = self._padded(order)
        order = order[:, self.skip :]
        if self.shuffle and self.world_size > 1:  # the rest, shared equally again (another process count)
            order = self._padded(order)
        return order[:, self.rank :: self.world_size]

    def _padded(self, order: torch.Tensor) -> torch.Tensor:
        per_rank = math.ceil(order.shape[1] / self.world_size)
        return torch.cat([order, order[:, : per_rank * self.world_size - order.shape[1]]], dim=1)

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices, positions = self._order().tolist()
        if not self.draws:
            return iter(indices)
        return iter([(index, draw_key(self.seed, self.epoch, position)) for index, position in zip(indices, positions)])

    def __len__(self) -> int:
        return self._order().shape[1]
