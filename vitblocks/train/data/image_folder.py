"""ImageFolder trees: one rule for which files are images, for counting and for loading.

A split folder holds one folder per class; every image below a class folder belongs to
that class, in nested subfolders too. An image is a file whose suffix is in
`IMAGE_SUFFIXES` (formats Pillow decodes), and the same rule decides which classes a
split has, how many images it counts and which files it loads. Hidden files and folders
(names starting with ".", such as `.ipynb_checkpoints` or `.DS_Store`) are not data.
Classes are numbered in timm's order (`class_order`): natural sort, ignoring case, so
`c2` comes before `c10` as in timm's `ImageDataset`, and a model trained here scores
the same through timm's datasets. Symbolic links are
followed, but a folder reached twice (a link loop such as `cls/loop -> ..`) is skipped
and named. 16-bit images are scaled to 8 bits rather than clipped. A file that cannot be
decoded is named; in training it is replaced by the next readable one, and past
`max_bad_images` such files in one loading process the run stops. In validation nothing
is replaced: the file comes with the label `UNREADABLE`, and the evaluation counts it and
scores the others (`vitblocks.train.run.evaluation.evaluate`), so an unreadable class is never
scored as another class's images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

from vitblocks.train.errors import DataError, FolderError

logger = logging.getLogger("vitblocks.train")

__all__ = ["IMAGE_SUFFIXES", "UNREADABLE", "FolderScan", "ImageFiles", "class_folders", "class_order", "is_image",
           "load_image", "scan_split"]

UNREADABLE = -1
"""The label a validation sample comes with when its file cannot be decoded: not scored, counted."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""Suffixes (any case) of the files counted and loaded as images."""


def is_image(name: str) -> bool:
    """Whether a file name is an image by `IMAGE_SUFFIXES`.

    Args:
        name: A file name or path.

    Returns:
        Whether its suffix is an image suffix.

    Examples:
        >>> is_image("a.JPEG"), is_image("labels.txt")
        (True, False)
    """
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def class_order(name: str) -> tuple[list[int | str], str]:
    """The sort key of class names: timm's natural order (digits as numbers, case ignored).

    Ties between names that differ only in case, which timm leaves to chance, are broken
    by the name itself.

    Args:
        name: A class (folder) name.

    Returns:
        The key.

    Examples:
        >>> sorted(["c10", "c2", "C1"], key=class_order)
        ['C1', 'c2', 'c10']
    """
    return natural_key(name), name


def _entries(folder: Path, ordered: bool = True) -> Iterator[os.DirEntry]:
    """A folder's entries that are not hidden: sorted by name, or as the filesystem lists them
    (read lazily, so a search that stops early does not list a large folder whole)."""
    try:
        with os.scandir(folder) as listing:
            entries = (entry for entry in listing if not entry.name.startswith("."))
            yield from sorted(entries, key=lambda entry: entry.name) if ordered else entries
    except OSError as error:
        raise FolderError(f"cannot read the folder {folder}: {error.strerror or error}; fix its permissions or "
                          "move it out of the dataset") from None


def _walk(folder: Path, seen: set[tuple[int, int]], loops: list[str], ordered: bool = True) -> Iterator[str]:
    """Image paths below `folder`, depth first (sorted when `ordered`), each folder visited once."""
    pending = [folder]
    while pending:
        subfolders = []
        for entry in _entries(pending.pop(), ordered):
            if entry.is_dir(follow_symlinks=True):
                info = entry.stat(follow_symlinks=True)
                if (info.st_dev, info.st_ino) in seen:
                    loops.append(entry.path)
                    continue
                seen.add((info.st_dev, info.st_ino))
                subfolders.append(Path(entry.path))
            elif is_image(entry.name) and entry.is_file(follow_symlinks=True):
                yield entry.path
        pending.extend(reversed(subfolders))


def class_folders(split: Path) -> list[Path]:
    """The folders directly in a split folder, in class order (each a class if it holds an image).

    Args:
        split: A split folder.

    Returns:
        The folders.

    Raises:
        FolderError: If the split folder cannot be listed.
    """
    folders = [Path(entry.path) for entry in _entries(split) if entry.is_dir(follow_symlinks=True)]
    return sorted(folders, key=lambda folder: class_order(folder.name))


def holds_images(folder: Path) -> bool:
    """Whether any image lies below a folder (stops at the first).

    Args:
        folder: A class folder.

    Returns:
        Whether it holds an image.

    Raises:
        FolderError: If a folder on the way cannot be listed.
    """
    info = folder.stat()
    return next(_walk(folder, {(info.st_dev, info.st_ino)}, [], ordered=False), None) is not None


@dataclass
class FolderScan:
    """What a split folder holds.

    Attributes:
        files: Image paths, class by class.
        labels: The class name of each file.
        counts: Images per class folder that holds any.
        empty: Class folders that hold no image.
        loops: Folders skipped because they were reached before (link loops).
    """

    files: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)


def scan_split(split: Path) -> FolderScan:
    """List every image of a split folder by the one rule.

    Args:
        split: E.g. `root/train`.

    Returns:
        The scan.

    Raises:
        FolderError: If a folder of the tree cannot be listed.
    """
    scan = FolderScan()
    info = split.stat()
    seen = {(info.st_dev, info.st_ino)}
    for folder in class_folders(split):
        mark = folder.stat()
        if (mark.st_dev, mark.st_ino) in seen:
            scan.loops.append(str(folder))
            continue
        seen.add((mark.st_dev, mark.st_ino))
        images = list(_walk(folder, seen, scan.loops))
        if not images:
            scan.empty.append(folder.name)
            continue
        scan.files += images
        scan.labels += [folder.name] * len(images)
        scan.counts[folder.name] = len(images)
    return scan


def load_image(path: str | Path | BinaryIO) -> Any:
    """Open an image as 8-bit RGB, scaling 16-bit and 32-bit integer pixels instead of clipping them.

    Args:
        path: The file (or its bytes, as a file object).

    Returns:
        A PIL image in mode RGB.
    """
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I"):  # "I;16*" (16-bit) or "I" (32-bit integers, from 16-bit PNGs)
            pixels = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
            image = Image.fromarray(np.clip(pixels * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
        elif image.mode == "F":  # floating point: 0..1, or already 0..255
            pixels = np.asarray(image, dtype=np.float64)
            scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0
            image = Image.fromarray(np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8), "L")
        return image.convert("RGB")


class ImageFiles(Dataset):
    """The images of a split folder with their labels, loaded by `load_image`.

    Args:
        split: The split folder.
        class_to_index: Label of each class name (the train split's numbering).
        transform: Applied to each PIL image.
        max_bad_images: Undecodable files skipped per loading process before the run stops.
        scan: A scan of `split` already made.
        uint8: The transform gives uint8 (C, H, W) tensors, to be normalized on the device
            (`vitblocks.train.data.feed`).
        read_bytes: Give each file's bytes (a uint8 1-D tensor) instead of decoding it, for
            decoding on the device (`vitblocks.train.data.device_decode`); `transform` is not used.
        substitute: Replace a file that cannot be decoded by the next readable one
            (training); False (validation): give a blank image labelled `UNREADABLE`.
    """

    def __init__(self, split: Path, class_to_index: dict[str, int], transform: Callable | None = None,
                 max_bad_images: int = 100, scan: FolderScan | None = None, uint8: bool = False,
                 read_bytes: bool = False, substitute: bool = True) -> None:
        self.split, self.transform, self.max_bad_images = Path(split), transform, max_bad_images
        self.uint8, self.read_bytes, self.substitute = uint8, read_bytes, substitute
        self.scan = scan or scan_split(self.split)
        self.relabel(class_to_index)
        self.bad: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def relabel(self, class_to_index: dict[str, int]) -> None:
        """Label each file by its class (anew, by a checkpoint's class order, on resume).

        Args:
            class_to_index: Label of each class name.
        """
        self.samples = [(path, class_to_index[label]) for path, label in zip(self.scan.files, self.scan.labels)]

    def class_counts(self) -> dict[str, int]:
        """Images per class.

        Returns:
            Class name -> image count, for the classes that hold images.
        """
        return dict(self.scan.counts)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f"index {index} is out of range for {len(self.samples)} images")
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                if self.read_bytes:
                    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8), label
                image = load_image(path)
            except Exception as error:  # noqa: BLE001 - PIL raises many types for files it cannot decode
                self._skip(path, error)
                if not self.substitute:
                    return self._blank(), UNREADABLE
                continue
            return (self.transform(image) if self.transform else image), label
        raise self._too_many(f"no image of {self.split} could be decoded")

    def _blank(self) -> Any:
        """What an unreadable validation file's place holds: a black image of the transform's output size."""
        if self.read_bytes:
            return torch.zeros(0, dtype=torch.uint8)
        from PIL import Image

        image = Image.new("RGB", (8, 8))
        return self.transform(image) if self.transform else image

    def _skip(self, path: str, error: Exception) -> None:
        if path in self.bad:  # named once; later epochs skip it quietly
            return
        self.bad.append(path)
        fate = "replaced by the next image" if self.substitute else "not scored"
        logger.warning(f"skipped {path}: it cannot be decoded ({type(error).__name__}: "
                       f"{' '.join(str(error).split())[:120]}); {fate}")
        if self.substitute and len(self.bad) > self.max_bad_images:
            raise self._too_many(f"{len(self.bad)} images of {self.split} cannot be decoded, more than "
                                 f"data.max_bad_images={self.max_bad_images}")

    def _too_many(self, message: str) -> Exception:
        shown = ", ".join(self.bad[:5]) + (", ..." if len(self.bad) > 5 else "")
        return DataError(f"{message} (e.g. {shown}); stopped. Replace or remove them, or raise "
                         "data.max_bad_images to skip more.")
