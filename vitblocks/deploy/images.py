"""Image files for prediction and calibration: which paths, decoded and preprocessed in batches.

Arguments name files, folders (searched recursively for image files by suffix) or glob
patterns (`photos/*.jpg`, `**` too). Files are decoded by `vitblocks.train.data.decoders`
(TorchCodec where installed, torchvision where not); a file that is missing or cannot be
decoded is named in the result and skipped, never fatal.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitblocks.deploy.preprocess import preprocess
from vitblocks.train.data.decoders import ImageDecoder, image_decoder

GLOB_CHARACTERS = frozenset("*?[")

DECODABLE = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif"})
"""The suffixes a folder or pattern is searched for: what both decoders read (a file named on its own is
always tried)."""


def is_decodable(path: Path) -> bool:
    """Whether a file's suffix is one both decoders read.

    Args:
        path: The file.

    Returns:
        True for JPEG, PNG, WebP and GIF names, any case.

    Examples:
        >>> is_decodable(Path("a/B.JPG")), is_decodable(Path("notes.txt"))
        (True, False)
    """
    return path.suffix.lower() in DECODABLE


@dataclass
class ImageList:
    """The files some arguments name.

    Attributes:
        paths: Image files, in the order named (a folder's sorted).
        missing: Arguments that named nothing (a path that does not exist, a glob with no
            match), with why.
    """

    paths: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)


def list_images(specs: Sequence[str]) -> ImageList:
    """The image files named by files, folders and glob patterns.

    Args:
        specs: The arguments.

    Returns:
        The files, and what named none.
    """
    found = ImageList()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and is_decodable(p))
            found.paths += inside
            if not inside:
                found.missing.append((spec, "a folder without image files"))
        elif path.is_file():
            found.paths.append(path)
        elif GLOB_CHARACTERS & set(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                             if Path(p).is_file() and is_decodable(Path(p)))
            found.paths += matches
            if not matches:
                found.missing.append((spec, "a pattern that matches no image file"))
        else:
            found.missing.append((spec, "no such file or folder"))
    return found


def decoded_batches(paths: Sequence[Path], preprocessing: dict[str, Any], batch_size: int,
                    decoder: ImageDecoder | None = None) -> Iterator[tuple[list[Path], torch.Tensor, list[tuple]]]:
    """Decode and preprocess files in batches, skipping those that cannot be decoded.

    Args:
        paths: The files.
        preprocessing: The model's data config (`vitblocks.deploy.preprocess.preprocess`).
        batch_size: Files per batch.
        decoder: The decoder (default: `image_decoder()`).

    Yields:
        The batch's decoded files, their images (N, 3, S, S) (N may be 0), and the
        batch's skipped files with why.
    """
    decoder = decoder or image_decoder()
    for start in range(0, len(paths), batch_size):
        good, images, skipped = [], [], []
        for path in paths[start:start + batch_size]:
            try:
                data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
                image = preprocess(decoder.decode(data), preprocessing)
            except Exception as error:  # noqa: BLE001 - decoders raise many types for files they cannot read
                skipped.append((path, f"{type(error).__name__}: {first_sentence(str(error))}"))
                continue
            good.append(path)
            images.append(image)
        yield good, torch.stack(images) if images else torch.empty(0, *preprocessing["input_size"]), skipped


def first_sentence(message: str, limit: int = 160) -> str:
    """A decoder's message on one line, up to its first full stop (decoders append advice that fits no file).

    Args:
        message: The message.
        limit: The most characters kept.

    Returns:
        The shortened message.

    Examples:
        >>> first_sentence("Unsupported image format. Supported formats are JPEG, PNG.")
        'Unsupported image format.'
    """
    flat = " ".join(message.split())
    cut = flat.find(". ")
    return (flat if cut < 0 else flat[:cut + 1])[:limit]
