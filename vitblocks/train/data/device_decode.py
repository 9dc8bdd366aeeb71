"""`data.decode="gpu"`: workers read file bytes; JPEGs are decoded, cropped and flipped on the device.

A small model on one GPU trains on thousands of images a second, more than PIL decoding
and cropping on the host's cores can give (about 150-250 images per second per core at
224 px). With `data.decode="gpu"` the loader's workers only read each file's bytes; the
main process hands each batch's JPEGs to one batched `decode_jpeg` call on the device
(TorchCodec's, or torchvision's where TorchCodec is not installed: `vitblocks.train.data.decoders`;
nvJPEG on CUDA) and crops, resizes and flips every image there. Files that are not JPEG
(PNG, TIFF, ...) are decoded on the host by the same rules as the CPU path
(`vitblocks.train.data.image_folder.load_image`) and copied over.

The crops and flips are drawn from the main process's torch generator, which checkpoints
hold, so resuming stays exact. What runs here: torchvision's RandomResizedCrop parameters
(the recipe's `augment.scale`, ratio 3/4 to 4/3), the flip, and for evaluation the resize
to `img_size / crop_pct` and the center crop. RandAugment and color jitter have no device
version here, so the config refuses them with this decode.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as TF
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from vitblocks.train.data.decoders import image_decoder
from vitblocks.train.data.image_folder import UNREADABLE, load_image
from vitblocks.train.errors import DataError
from vitblocks.train.process.logs import logger

JPEG_MAGIC = (0xFF, 0xD8)
RATIO = (3 / 4, 4 / 3)


class EncodedBatch(NamedTuple):
    """A batch of encoded files, as one buffer: a worker sends one tensor, not one per file.

    Attributes:
        data: The files' bytes, one after another (uint8, 1-D).
        lengths: Each file's length in bytes.
    """

    data: torch.Tensor
    lengths: torch.Tensor

    def files(self) -> list[torch.Tensor]:
        """Each file's bytes.

        Returns:
            Views of `data`, one per file.
        """
        return list(torch.split(self.data, self.lengths.tolist()))


def collate_encoded(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    """Collate (file bytes, label) samples into one byte buffer with the files' lengths.

    Args:
        batch: Samples from `ImageFiles(read_bytes=True)`.

    Returns:
        (the encoded batch, labels).
    """
    lengths = torch.tensor([len(data) for data, _ in batch], dtype=torch.long)
    return EncodedBatch(torch.cat([data for data, _ in batch]), lengths), torch.tensor([label for _, label in batch])


class DeviceDecode:
    """Decode a batch of encoded images on a device and crop them to one size.

    Args:
        img_size: Output height and width.
        train: Random-resized crop and flip (training), or resize and center crop.
        device: Where decoding and cropping run.
        scale: Crop area range (training).
        hflip: Flip probability (training).
        crop_pct: Center-crop fraction (evaluation).
        interpolation: "bicubic" or "bilinear" (anything else: bilinear).
        max_bad_images: Undecodable files replaced (by another image of their batch,
            named in a warning) before the run stops.
    """

    def __init__(self, img_size: int, train: bool, device: torch.device, scale: tuple[float, float] = (0.08, 1.0),
                 hflip: float = 0.5, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 max_bad_images: int = 100) -> None:
        self.img_size, self.train, self.device = img_size, train, torch.device(device)
        self.scale, self.hflip, self.crop_pct = tuple(scale), hflip, crop_pct
        self.interpolation = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
        self.max_bad_images, self.bad = max_bad_images, 0
        self.last_unreadable: list[int] = []  # positions in the last batch whose file did not decode

    def __call__(self, encoded: EncodedBatch | list[torch.Tensor]) -> torch.Tensor:
        """Decode and crop one batch.

        Args:
            encoded: The files' bytes (uint8, on the CPU): a collated batch or one tensor per file.

        Returns:
            (B, 3, img_size, img_size) uint8 on the device.
        """
        images = self.decode(encoded.files() if isinstance(encoded, EncodedBatch) else encoded)
        return torch.stack([self.crop(image) for image in images])

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decode each file: JPEGs in one batched call on the device, other formats on the host.

        Args:
            encoded: Each file's bytes (uint8, 1-D, on the CPU).

        Returns:
            (3, H, W) uint8 images on the device; an undecodable file's place is taken by
            another image of the batch (in training, counted against `max_bad_images`;
            in evaluation, listed in `last_unreadable`, and not scored).

        Raises:
            DataError: In training, if no file of the batch decodes, or too many files have not.
        """
        jpeg = [i for i, data in enumerate(encoded) if len(data) > 2 and tuple(data[:2].tolist()) == JPEG_MAGIC]
        images: list[torch.Tensor | None] = [None] * len(encoded)
        if jpeg:
            try:
                decoded = image_decoder().decode_jpegs([encoded[i] for i in jpeg], self.device)
                for i, image in zip(jpeg, decoded):
                    images[i] = image
            except (RuntimeError, ValueError):  # one bad file fails the batch call: decode them one by one
                for i in jpeg:
                    images[i] = self._one_jpeg(encoded[i])
        for i, image in enumerate(images):
            if image is None and i not in jpeg:
                images[i] = self._on_host(encoded[i])
        good = [image for image in images if image is not None]
        self.last_unreadable = [i for i, image in enumerate(images) if image is None]
        if not good and not self.train:  # nothing of it is scored: any image of the output size holds the places
            good = [torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8, device=self.device)]
        if not good:
            raise DataError(f"no image of a batch of {len(encoded)} could be decoded; check the files (not empty, "
                            "truncated, or of another format)")
        return [image if image is not None else good[i % len(good)] for i, image in enumerate(images)]

    def _one_jpeg(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return image_decoder().decode_jpegs([data], self.device)[0]
        except (RuntimeError, ValueError) as error:
            return self._skipped(error)

    def _on_host(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            image = load_image(io.BytesIO(data.numpy().tobytes()))
        except Exception as error:  # noqa: BLE001 - PIL raises many types for files it cannot decode
            return self._skipped(error)
        return TF.pil_to_tensor(image).to(self.device, non_blocking=True)

    def _skipped(self, error: Exception) -> None:
        self.bad += 1
        fate = "another image of its batch takes its place" if self.train else "it is not scored"
        logger.warning(f"skipped an image that cannot be decoded ({type(error).__name__}: "
                       f"{' '.join(str(error).split())[:120]}); {fate}")
        if self.train and self.bad > self.max_bad_images:
            raise DataError(f"{self.bad} images cannot be decoded, more than data.max_bad_images="
                            f"{self.max_bad_images}; stopped. Replace or remove them, or raise data.max_bad_images.")
        return None

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """Crop one image to the output size.

        Args:
            image: (3, H, W) uint8 on the device.

        Returns:
            (3, img_size, img_size): a random-resized crop, maybe flipped (training), or the
            resize and center crop (evaluation).
        """
        size = [self.img_size, self.img_size]
        if self.train:
            top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(RATIO))
            image = TF.resized_crop(image, top, left, height, width, size, self.interpolation, antialias=True)
            if self.hflip > 0 and torch.rand(()) < self.hflip:
                image = TF.horizontal_flip(image)
            return image
        image = TF.resize(image, [math.floor(self.img_size / self.crop_pct)], self.interpolation, antialias=True)
        return TF.center_crop(image, size)


class DecodedBatches:
    """A loader of encoded images, decoded, normalized and randomly erased on the device.

    Args:
        loader: Batches of (encoded files, labels), e.g. a `DataLoader` with
            `collate_encoded`.
        decode: The decoder.
        mean: Normalization mean in [0, 1] units.
        std: Normalization standard deviation.
        re_prob: Random-erasing probability (timm's, per image, "pixel" mode).
    """

    def __init__(self, loader: Iterable, decode: DeviceDecode, mean: Sequence[float], std: Sequence[float],
                 re_prob: float = 0.0) -> None:
        self.loader, self.decode, self.device = loader, decode, decode.device
        self.mean = torch.tensor([255 * m for m in mean], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=self.device).view(1, 3, 1, 1)
        self.random_erasing: Callable | None = None
        if re_prob > 0:
            self.random_erasing = RandomErasing(re_prob, mode="pixel", device=self.device)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for encoded, labels in self.loader:
            images = self.decode(encoded).float().sub_(self.mean).div_(self.std)
            if self.decode.last_unreadable and not self.decode.train:  # counted by the evaluation, not scored
                labels = labels.clone()
                labels[self.decode.last_unreadable] = UNREADABLE
            if self.random_erasing is not None:
                images = self.random_erasing(images)
            yield images, labels.to(self.device, non_blocking=True)
