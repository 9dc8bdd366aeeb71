"""Which library decodes image files: TorchCodec where it is installed, torchvision where it is not.

torchvision 0.29 moves its image decoding to TorchCodec. Both decode JPEG, PNG and
WebP from bytes into (3, H, W) uint8 tensors, JPEGs on CUDA too (nvJPEG). One function,
`image_decoder`, chooses for the whole package (`vitblocks.predict` and the trainer's
`data.decode="gpu"`), and its `name` is what run headers and the prediction tool print.
`VITBLOCKS_DECODER=torchvision` forces torchvision where TorchCodec is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DECODERS = ("torchcodec", "torchvision")


@dataclass(frozen=True)
class ImageDecoder:
    """Functions that decode encoded image bytes with one library.

    Attributes:
        name: "torchcodec" or "torchvision".
        decode: One file's bytes (1-D uint8 on the CPU) to a (3, H, W) uint8 RGB image on
            the CPU; raises for bytes that are not an image it reads.
        decode_jpegs: Many JPEG files' bytes to RGB images on a device, in one call.
    """

    name: str
    decode: Callable[[torch.Tensor], torch.Tensor]
    decode_jpegs: Callable[[Sequence[torch.Tensor], torch.device], list[torch.Tensor]]


@functools.cache
def torchcodec_available() -> bool:
    """Whether TorchCodec's image decoders can be imported here.

    Returns:
        True if `torchcodec.decoders` imports (its native libraries load).
    """
    if importlib.util.find_spec("torchcodec") is None:
        return False
    try:
        import torchcodec.decoders  # noqa: F401 - loads the native libraries
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def image_decoder(name: str | None = None) -> ImageDecoder:
    """The image decoder to use: TorchCodec if it is installed, else torchvision.

    Args:
        name: Force one ("torchcodec" or "torchvision"); None reads `VITBLOCKS_DECODER`,
            then chooses.

    Returns:
        The decoder.

    Raises:
        ValueError: If `name` is not one of `DECODERS`, or TorchCodec is asked for and
            cannot be imported.
    """
    name = name or os.environ.get("VITBLOCKS_DECODER") or None
    if name is not None and name not in DECODERS:
        raise ValueError(f"image decoder {name!r} is not one of {', '.join(DECODERS)} (VITBLOCKS_DECODER or the "
                         "decoder argument)")
    if name == "torchcodec" and not torchcodec_available():
        raise ValueError("the torchcodec image decoder was asked for but torchcodec cannot be imported here: "
                         "pip install torchcodec, or use torchvision")
    if name == "torchvision" or (name is None and not torchcodec_available()):
        return _torchvision_decoder()
    return _torchcodec_decoder()


def as_rgb8(image: torch.Tensor) -> torch.Tensor:
    """A decoded image as one (3, H, W) uint8 frame, whatever the file held.

    An animated file (GIF, WebP) gives its first frame; a 16-bit PNG is scaled to 8 bits.

    Args:
        image: A decoder's (3, H, W) or (frames, 3, H, W) RGB output, uint8 or uint16.

    Returns:
        (3, H, W) uint8.

    Examples:
        >>> as_rgb8(torch.full((2, 3, 4, 4), 65535, dtype=torch.uint16)).unique().tolist()
        [255]
    """
    if image.dim() == 4:
        image = image[0]
    if image.dtype != torch.uint8:
        image = (image.float() * (255 / 65535)).round_().to(torch.uint8)
    return image


@functools.cache
def _torchcodec_decoder() -> ImageDecoder:
    from torchcodec.decoders import decode_image, decode_jpeg

    def decode(data: torch.Tensor) -> torch.Tensor:
        return as_rgb8(decode_image(data, mode="RGB"))

    def decode_jpegs(files: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return list(decode_jpeg(list(files), mode="RGB", device=device))

    return ImageDecoder("torchcodec", decode, decode_jpegs)


@functools.cache
def _torchvision_decoder() -> ImageDecoder:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    def decode(data: torch.Tensor) -> torch.Tensor:
        return as_rgb8(decode_image(data, mode=ImageReadMode.RGB))

    def decode_jpegs(files: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return list(decode_jpeg(list(files), mode=ImageReadMode.RGB, device=device))

    return ImageDecoder("torchvision", decode, decode_jpegs)
