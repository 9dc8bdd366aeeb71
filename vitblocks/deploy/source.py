"""What is deployed: a trained run (its folder or a checkpoint) or a registered model, with its preprocessing.

`load_source` reads any of

- a run folder written by the trainer (its `best.pth`, else its `last.pth`),
- a trainer checkpoint (`best.pth`, `last.pth`, or a copy of one),
- a model name registered with timm (random weights: for timing and smoke tests),

into a `Source`: the model in eval mode on the CPU, its class names in label order, the
preprocessing its weights expect, and, for a run, validation images to check an export
against and calibrate int8 with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vitblocks.deploy.errors import DeployError
from vitblocks.eval import checkpoint_weights, stored_config, trained_model, trainer_checkpoint
from vitblocks.io import CheckpointError
from vitblocks.train.config.recipe import apply_overrides
from vitblocks.train.config.schema import TrainConfig
from vitblocks.train.data.datasets import folder_classes, split_folder
from vitblocks.train.data.image_folder import class_order
from vitblocks.train.errors import ConfigError, DataError
from vitblocks.train.outputs.model_folder import data_config
from vitblocks.train.run.builders import build_data

CHECKPOINTS = ("best.pth", "last.pth")
"""A run folder's checkpoints, in the order one is taken."""


@dataclasses.dataclass
class Source:
    """A model to deploy, with what an artifact must know to be used like it.

    Attributes:
        model: The model, in eval mode, on the CPU, in float32.
        name: Its timm model name.
        origin: Where it came from, for messages and the manifest (a checkpoint's path,
            or "model NAME, random weights").
        preprocessing: timm's data-config keys: input_size, mean, std, crop_pct,
            crop_mode, interpolation.
        classes: The class names in label order.
        config: The run's config (None for a model name).
    """

    model: nn.Module
    name: str
    origin: str
    preprocessing: dict[str, Any]
    classes: list[str]
    config: TrainConfig | None = None
    _read: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _split_ends: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    @property
    def img_size(self) -> int:
        """The side of the square images the model takes."""
        return int(self.preprocessing["input_size"][-1])

    def images(self, count: int, seed: int = 0, skip: int = 0) -> tuple[torch.Tensor, str]:
        """Up to `count` preprocessed images to check or calibrate an export with.

        A run gives images of its validation split in the split's order, after the first
        `skip` where the split holds enough (else its last `count`); a model name, or a run
        whose data cannot be read here, gives random images (and says so).

        Args:
            count: How many.
            seed: Seed of the random images.
            skip: Images of the split to pass over first (those int8 calibrated on).

        Returns:
            (N, 3, H, W) float32 images and a description of where they came from.
        """
        reason = "a model name has no data"
        if self.config is not None:
            try:
                images = self._validation_images(count + skip)
                origin = f"the run's validation split ({self.config.data.dataset})"
                if len(images) < count + skip and skip:
                    origin += f", overlapping the calibration images: the split holds {len(images)}"
                return images[-count:] if len(images) < count + skip else images[skip:], origin
            except (DataError, ConfigError, OSError) as error:
                reason = f"the run's data cannot be read here: {' '.join(str(error).split())[:200]}"
        generator = torch.Generator().manual_seed(seed)
        if skip:
            torch.randn(skip, *self.preprocessing["input_size"], generator=generator)  # not the calibration images
        return torch.randn(count, *self.preprocessing["input_size"], generator=generator), f"random images ({reason})"

    def validation_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The run's validation split, preprocessed, in its order, with labels (read here, no loader workers).

        Yields:
            Batches of float32 images (N, 3, H, W) and their labels (N,).

        Raises:
            DeployError: For a model name, which has no data.
            DataError: If the run's data cannot be read here.
        """
        if self.config is None:
            raise DeployError(f"{self.origin} has no validation data: give a run folder or a checkpoint")
        config = apply_overrides(self.config, ["data.workers=0"])
        for images, labels in build_data(config, train=False, classes=self.classes).val_loader(torch.device("cpu")):
            yield images.float(), labels

    def _validation_images(self, count: int) -> torch.Tensor:
        # the first `count` images of the split, read once per source however often asked for
        if self._read is None or (len(self._read) < count and not self._split_ends):
            taken: list[torch.Tensor] = []
            for images, _ in self.validation_batches():
                taken.append(images)
                if sum(len(t) for t in taken) >= count:
                    break
            if not taken:
                raise DataError(f"the validation split of {self.config.data.dataset} is empty")
            self._read = torch.cat(taken)
            self._split_ends = len(self._read) < count
        return self._read[:count]


def load_source(spec: str | Path, ema: bool = False) -> Source:
    """Read a run folder, a trainer checkpoint or a registered model name.

    Args:
        spec: The run folder, the checkpoint, or the model name.
        ema: Take a checkpoint's EMA weights.

    Returns:
        The source, its model in eval mode.

    Raises:
        DeployError: If `spec` is none of these, a run folder holds no checkpoint, or its
            weights cannot be read or do not fit its model.
    """
    path = Path(spec)
    if path.is_dir():
        found = [path / name for name in CHECKPOINTS if (path / name).is_file()]
        if not found:
            hint = " (it is an export: give it to vitblocks.predict)" if any(path.glob("*.json")) else ""
            raise DeployError(f"{path} holds no checkpoint ({' or '.join(CHECKPOINTS)}){hint}: give a run folder "
                              "the trainer has written, a checkpoint file, or a registered model name")
        path = found[0]
    if path.is_file():
        return _from_checkpoint(path, ema)
    if timm.is_model(str(spec)):
        if ema:
            raise DeployError(f"--ema needs a checkpoint; the model name {spec} has random weights")
        model = timm.create_model(str(spec)).eval()
        config = timm.data.resolve_model_data_config(model)
        preprocessing = {key: config[key] for key in ("input_size", "mean", "std", "crop_pct", "crop_mode",
                                                      "interpolation")}
        return Source(model, str(spec), f"model {spec}, random weights", preprocessing, _default_classes(model))
    raise DeployError(f"{spec} is not a run folder, a checkpoint file or a registered model name (e.g. sret_t); "
                      "check the path")


def _from_checkpoint(path: Path, ema: bool) -> Source:
    try:
        state = trainer_checkpoint(str(path))
        config = stored_config(state)
        model = trained_model(config, checkpoint_weights(state, str(path), ema), str(path)).eval()
    except (CheckpointError, ConfigError) as error:
        raise DeployError(str(error)) from None
    classes = _class_names(state, config)
    origin = f"{path}" + (" (EMA weights)" if ema else "")
    return Source(model, config.model.name, origin, data_config(config), classes, config)


def _class_names(state: dict[str, Any], config: TrainConfig) -> list[str]:
    """The checkpoint's own class list; for weights without one, the run's data folder's (if it is here)."""
    classes = list(state.get("classes") or [])
    if not classes and config.data.dataset == "imagefolder":  # timm's rule: the training split's, in natural order
        root = Path(config.data.root)
        try:
            found = folder_classes(split_folder(root, "train")) or folder_classes(split_folder(root, "val"))
        except (DataError, OSError):
            found = []
        classes = sorted(found, key=class_order)
    if len(classes) != config.data.num_classes:
        classes = [f"class {i}" for i in range(config.data.num_classes)]
    return classes


def _default_classes(model: nn.Module) -> list[str]:
    """ImageNet's class descriptions for a 1000-class model, else "class N"."""
    count = getattr(model, "num_classes", 0)
    if count == 1000:
        return list(timm.data.ImageNetInfo("imagenet-1k").label_descriptions())
    return [f"class {i}" for i in range(count)]
