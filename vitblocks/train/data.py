"""Datasets, transforms and resumable loaders for the trainer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import ImageDataset, create_transform
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from vitblocks.train.config import DataConfig, TrainConfig
from vitblocks.train.extras import import_train_extra

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DataError(FileNotFoundError):
    """A dataset folder that is missing or has no images.

    Args:
        message: What is wrong.
        advice: What to do, for the trainer's command line (eval gives its own).
    """

    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(f"{message}\n{advice}" if advice else message)
        self.problem, self.advice = message, advice


_TRAINER_ADVICE = ("Point the recipe at your copy with --set data.root=/path/to/imagenet, check the recipe first "
                   "with --smoke (synthetic data), or try the offline quickstart: "
                   "python -m vitblocks.train recipes/quickstart.py")


def _layout_help(root: Path, split: str) -> str:
    return (
        f"expected an ImageFolder tree at {root}:\n"
        f"    {root}/train/<class name>/<image>.jpg\n"
        f"    {root}/val/<class name>/<image>.jpg\n"
        f"but {root / split} {'does not exist' if not (root / split).exists() else 'holds no images in class folders'}."
    )


def check_image_folder(root: Path, split: str) -> None:
    """Check that a split folder holds class folders with images.

    Args:
        root: Dataset root.
        split: "train" or "val".

    Raises:
        DataError: Explaining the expected layout and what to do.
    """
    folder = root / split
    if not (folder.is_dir() and any(_holds_images(d) for d in folder.iterdir())):
        raise DataError(_layout_help(root, split), _TRAINER_ADVICE)


def _holds_images(folder: Path) -> bool:
    """Whether a folder is a class folder: a directory with at least one image file."""
    return folder.is_dir() and any(p.suffix.lower() in _IMAGE_SUFFIXES for p in folder.iterdir())


def folder_classes(folder: Path) -> list[str]:
    """The class names of an ImageFolder split: its subfolders that hold images, sorted.

    Args:
        folder: A split folder, e.g. `root/train`.

    Returns:
        The names.
    """
    if not folder.is_dir():
        return []
    return sorted(d.name for d in folder.iterdir() if _holds_images(d))


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
    elif data.dataset == "synthetic":
        return [str(i) for i in range(data.num_classes)]
    else:
        root = Path(data.root)
        names = folder_classes(root / "train") or folder_classes(root / "val")
        if not names:
            return []  # the layout check explains what is missing
    if len(names) != data.num_classes:
        where = "scikit-learn's digits" if data.dataset == "digits" else f"{Path(data.root) / 'train'}"
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise DataError(f"data.num_classes={data.num_classes} but {where} has {len(names)} classes ({shown}); "
                        f"set data.num_classes={len(names)}")
    return names


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


def _synthetic(config: DataConfig, train: bool, seed: int) -> Dataset:
    """Random images whose mean brightness per channel encodes the label (learnable)."""
    count = config.synthetic_samples if train else max(config.synthetic_samples // 4, config.batch_size)
    gen = torch.Generator().manual_seed(seed + (0 if train else 1))
    labels = torch.randint(0, config.num_classes, (count,), generator=gen)
    images = torch.randn(count, 3, config.img_size, config.img_size, generator=gen)
    images += (labels.float() / max(config.num_classes - 1, 1) - 0.5).view(-1, 1, 1, 1) * 2
    return TensorDataset(images, labels)


def build_dataset(config: TrainConfig, train: bool, classes: list[str] | None = None) -> Dataset:
    """The training or validation dataset of a config.

    Both splits of an ImageFolder dataset number their classes by one list (the train
    split's), so a class missing from `val/` cannot shift the labels of the others.

    Args:
        config: The experiment.
        train: Training split (with augmentation) or validation split.
        classes: The class list (default: `dataset_classes(config)`).

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
        return _synthetic(data, train, config.seed)
    root, split = Path(data.root), "train" if train else "val"
    check_image_folder(root, split)
    classes = classes if classes is not None else dataset_classes(config)
    unknown = sorted(set(folder_classes(root / split)) - set(classes))
    if unknown:
        raise DataError(f"{root / split} has classes that the training classes lack: {', '.join(unknown[:8])}; "
                        f"every {split}/ class folder must also be in train/ (labels follow train/'s class list)")
    if train:
        aug = config.augment
        transform = create_transform(
            data.img_size, is_training=True, auto_augment=aug.auto_augment, color_jitter=aug.color_jitter,
            hflip=aug.hflip, scale=aug.scale, re_prob=aug.re_prob, re_mode="pixel", interpolation=data.interpolation,
            mean=data.mean, std=data.std,
        )
    else:
        transform = eval_transform(data)
    check_images_open(root / split)
    return ImageDataset(str(root / split), transform=transform, class_map={name: i for i, name in enumerate(classes)})


def check_images_open(folder: Path, per_class: int = 1) -> None:
    """Open the first image(s) of each class folder, so unreadable data fails before training.

    Args:
        folder: A split folder.
        per_class: Images tried per class.

    Raises:
        DataError: If none of the tried images opens, naming them and why.
    """
    from PIL import Image

    tried: list[str] = []
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
        images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:per_class]
        for image in images:
            try:
                with Image.open(image) as handle:
                    handle.verify()
                return
            except Exception as error:  # noqa: BLE001 - PIL raises many types for unreadable files
                tried.append(f"{image} ({type(error).__name__}: {' '.join(str(error).split())[:120]})")
    if tried:
        raise DataError(f"no image in {folder} could be read; tried: " + "; ".join(tried[:5])
                        + (f"; and {len(tried) - 5} more" if len(tried) > 5 else "")
                        + ". Check that the files are images (not empty, truncated, or of another format).")


def eval_transform(data: DataConfig) -> Callable:
    """Evaluation transform: resize to img_size / crop_pct, center-crop img_size, normalize.

    Args:
        data: Image size, crop fraction, interpolation and normalization.

    Returns:
        A torchvision transform.
    """
    return create_transform(
        data.img_size, is_training=False, crop_pct=data.crop_pct, interpolation=data.interpolation,
        mean=data.mean, std=data.std,
    )


class ResumableSampler(Sampler[int]):
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
    """

    def __init__(self, length: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 repeats: int = 1) -> None:
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size, self.repeats = rank, world_size, repeats
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch and where in it to start.

        Args:
            epoch: Epoch index (selects the order).
            skip: This rank's samples to skip (already seen before an interruption).
        """
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.length)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)[: self.length]
        if self.shuffle and self.world_size > 1:  # equal shares, so every rank runs the same number of steps
            per_rank = math.ceil(len(order) / self.world_size)
            order = torch.cat([order, order[: per_rank * self.world_size - len(order)]])
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip :])

    def __len__(self) -> int:
        return max(len(self._indices()) - self.skip, 0)


def make_loader(dataset: Dataset, sampler: ResumableSampler, batch_size: int, workers: int, train: bool,
                seed: int) -> DataLoader:
    """A DataLoader over a resumable sampler.

    Args:
        dataset: The dataset.
        sampler: Its sampler, with the epoch already set.
        batch_size: Samples per batch.
        workers: Worker processes.
        train: Drop the last partial batch.
        seed: Base seed; worker seeds follow the sampler's epoch.

    Returns:
        The loader.
    """
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        generator=torch.Generator().manual_seed(seed * 7919 + sampler.epoch),
    )
