"""A run folder that timm and the Hugging Face hub load as a model.

The trainer writes (through `vitblocks.train.outputs.run_folder.RunFolder`), at the end of a run
into its output folder and at each new best into `best/` beside it:

    model.safetensors       the weights
    model_ema.safetensors   the EMA weights (when `ema_decay` is set)
    config.json             timm's model config: architecture, num_classes, model_args
                            (every constructor argument, the widths of a custom SReT
                            included) and pretrained_cfg with the run's input size, mean,
                            std, crop and interpolation, and the class names in label
                            order (`label_names`)

so that, with nothing else known:

    model = timm.create_model("local-dir:runs/quickstart", pretrained=True)
    model = timm.create_model("local-dir:runs/quickstart/best", pretrained=True)

give the run's final and best models, and the folder can be uploaded to the hub as it is.
The JSON is timm's own (`timm.models.save_config_for_hf`). A converted model
(`model.convert`) has no timm constructor that rebuilds it, so its folders hold the
weights without config.json (evaluate them with `python -m vitblocks.eval`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from vitblocks.models.create import takes_img_size
from vitblocks.train.config.checks import WEIGHT_SOURCES
from vitblocks.train.config.schema import TrainConfig
from vitblocks.train.process.logs import logger


def data_config(config: TrainConfig) -> dict[str, Any]:
    """The preprocessing a run's weights expect, in timm's data-config keys.

    Args:
        config: The run's config.

    Returns:
        input_size, mean, std, crop_pct, crop_mode and interpolation. The digits are
        resized bilinearly to the image size, uncropped, whatever the data config says
        (`vitblocks.train.data.datasets`), and their folder says so.
    """
    data = config.data
    crop_pct, interpolation = (1.0, "bilinear") if data.dataset == "digits" else (data.crop_pct, data.interpolation)
    return {"input_size": (3, data.img_size, data.img_size), "mean": tuple(data.mean), "std": tuple(data.std),
            "crop_pct": crop_pct, "crop_mode": "center", "interpolation": interpolation}


def model_args(config: TrainConfig) -> dict[str, Any]:
    """The `timm.create_model` arguments that rebuild a run's model.

    Args:
        config: The run's config.

    Returns:
        `model.kwargs` with the class count and, for models that take it, the image size.
    """
    args = {key: value for key, value in config.model.kwargs.items() if key not in WEIGHT_SOURCES}
    args["num_classes"] = config.data.num_classes
    if takes_img_size(config.model.name):
        args["img_size"] = config.data.img_size
    return args


def model_config_json(model: nn.Module, config: TrainConfig, classes: list[str] | None = None) -> str | None:
    """timm's config.json of a run's model: architecture, constructor arguments, preprocessing, class names.

    Args:
        model: The model.
        config: The run's config (model name and preprocessing).
        classes: Class names in label order, stored as timm's `label_names`.

    Returns:
        The JSON text, or None for a model timm cannot rebuild (a converted model, or a
        constructor argument JSON cannot hold), which is said in a warning.
    """
    if config.model.convert:  # no timm constructor rebuilds a converted model
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        try:
            _write_config(path, model, config, classes)
        # a constructor argument JSON cannot hold (a class, a function), or a timm without this helper
        except (ValueError, TypeError, ImportError) as error:
            logger.warning(f"{config.output_dir}: no config.json, as timm cannot describe this model ({error}); load "
                           "the weights with python -m vitblocks.eval or the recipe")
            return None
        return path.read_text()


def _write_config(path: Path, model: nn.Module, config: TrainConfig, classes: list[str] | None) -> None:
    """timm's config.json of the model, describing this run's weights and preprocessing."""
    from timm.models._hub import save_config_for_hf  # save_for_hf's config half (its weights write is not atomic)

    save_config_for_hf(model, path, model_args=model_args(config))  # a Path: timm 1.0.29 calls path.open
    settings = json.loads(Path(path).read_text())
    cfg = settings["pretrained_cfg"]
    for key in ("origin_url", "paper_name", "paper_ids", "notes", "license", "hf_hub_id", "url", "file"):
        cfg.pop(key, None)  # those describe released weights, not these
    cfg.update(data_config(config), tag=Path(config.output_dir).name or "run", num_classes=config.data.num_classes)
    if classes:
        cfg["label_names"] = list(classes)
    cfg.pop("test_input_size", None)
    cfg.pop("test_crop_pct", None)
    Path(path).write_text(json.dumps(settings, indent=2) + "\n")
