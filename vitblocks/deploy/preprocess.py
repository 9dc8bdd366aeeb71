"""The evaluation preprocessing of a model, on decoded image tensors: resize, crop, normalize.

The same steps as timm's evaluation transform and the trainer's validation data: the
image resized to `input_size / crop_pct` (antialiased; the shorter side for a square
input, or keeping the aspect ratio so both sides cover a non-square one; both sides
exactly for `crop_mode="squash"`), the center `input_size` crop, scaled to [0, 1] and
normalized by the weights' mean and standard deviation. It runs on uint8 tensors from
`vitblocks.train.data.decoders`, so the prediction tool needs no PIL round trip;
resampling differs from PIL's by about a pixel step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from vitblocks.deploy.errors import DeployError

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS,
                  "box": InterpolationMode.BOX, "hamming": InterpolationMode.HAMMING}
"""timm's interpolation names and torchvision's modes."""

CROP_MODES = ("center", "squash")


def check_preprocessing(preprocessing: dict[str, Any]) -> None:
    """Refuse a preprocessing this module cannot reproduce, before any image is read.

    Args:
        preprocessing: timm's data-config keys.

    Raises:
        DeployError: For an unknown interpolation or crop mode, or a malformed size, mean or std.
    """
    interpolation = str(preprocessing.get("interpolation") or "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise DeployError(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}: set the "
                          "model's pretrained_cfg or the manifest to one of them")
    crop_mode = str(preprocessing.get("crop_mode") or "center")
    if crop_mode not in CROP_MODES:
        raise DeployError(f"crop_mode {crop_mode!r} is not reproduced here (only {', '.join(CROP_MODES)}): "
                          "preprocess the images with timm's transform and run the artifact from Python")
    size = preprocessing.get("input_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size)):
        raise DeployError(f"input_size must be [3, height, width], got {size!r}")
    for key in ("mean", "std"):
        values = preprocessing.get(key)
        if not (isinstance(values, (list, tuple)) and len(values) == size[0]
                and all(isinstance(v, (int, float)) for v in values)):
            raise DeployError(f"{key} must be {size[0]} numbers, got {values!r}")


def preprocess(image: torch.Tensor, preprocessing: dict[str, Any]) -> torch.Tensor:
    """One decoded image as the model's input.

    Args:
        image: (3, H, W) uint8 RGB.
        preprocessing: timm's data-config keys: input_size, mean, std, crop_pct,
            crop_mode, interpolation (checked by `check_preprocessing`).

    Returns:
        (3, height, width) float32, normalized.

    Examples:
        >>> image = torch.full((3, 40, 60), 255, dtype=torch.uint8)
        >>> config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875,
        ...           "interpolation": "bicubic"}
        >>> preprocess(image, config).shape, preprocess(image, config).max().item()
        (torch.Size([3, 32, 32]), 1.0)
    """
    height, width = (int(s) for s in preprocessing["input_size"][1:])
    crop_pct = float(preprocessing.get("crop_pct") or 1.0)
    mode = INTERPOLATIONS[str(preprocessing.get("interpolation") or "bicubic")]
    scaled = [math.floor(height / crop_pct), math.floor(width / crop_pct)]
    if preprocessing.get("crop_mode") == "squash":
        size = scaled
    elif height == width:
        size = scaled[:1]  # the shorter side
    else:
        ratio = max(scaled[0] / image.shape[-2], scaled[1] / image.shape[-1])
        size = [round(image.shape[-2] * ratio), round(image.shape[-1] * ratio)]
    image = TF.resize(image, size, mode, antialias=True)
    image = TF.center_crop(image, [height, width]).float().div_(255)
    return TF.normalize(image, list(preprocessing["mean"]), list(preprocessing["std"]))
