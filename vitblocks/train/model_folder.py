"""A run folder that timm and the Hugging Face hub load as a model.

The trainer writes, at the end of a run into its output folder and at each new best into
`best/` beside it:

    model.safetensors       the weights
    model_ema.safetensors   the EMA weights (when `ema_decay` is set)
    config.json             timm's model config: architecture, num_classes, model_args
                            (every constructor argument, the widths of a custom SReT
                            included) and pretrained_cfg with the run's input size, mean,
                            std, crop and interpolation

so that, with nothing else known::

    model = timm.create_model("local-dir:runs/quickstart", pretrained=True)
    model = timm.create_model("local-dir:runs/quickstart/best", pretrained=True)

give the run's final and best models, and the folder can be uploaded to the hub as it is.
The JSON is timm's own (`timm.models.save_config_for_hf`). A converted model
(`model.convert`) has no timm constructor that rebuilds it, so its folders hold the
weights without config.json (evaluate them with `python -m vitblocks.eval`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from vitblocks.io import replacing, save_model_atomic
from vitblocks.models.create import takes_img_size
from vitblocks.train.config import TrainConfig
from vitblocks.train.config_checks import WEIGHT_SOURCES
from vitblocks.train.logs import logger

MODEL_FILES = ("model.safetensors", "model_ema.safetensors", "config.json")
"""What a model folder holds."""

BEST_FOLDER = "best"
"""The model folder of a run's best epoch, inside its output folder."""


def data_config(config: TrainConfig) -> dict[str, Any]:
    """The preprocessing a run's weights expect, in timm's data-config keys.

    Args:
        config: The run's config.

    Returns:
        input_size, mean, std, crop_pct, crop_mode and interpolation.
    """
    data = config.data
    return {"input_size": (3, data.img_size, data.img_size), "mean": tuple(data.mean), "std": tuple(data.std),
            "crop_pct": data.crop_pct, "crop_mode": "center", "interpolation": data.interpolation}


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


def write_model_folder(folder: str | Path, model: nn.Module, config: TrainConfig, ema: nn.Module | None = None) -> list[Path]:
    """Write a model folder: weights, EMA weights and timm's config.json, each file atomically.

    The weights go first and config.json last, so a folder with a config.json always
    has the weights it describes.

    Args:
        folder: Where (created if needed).
        model: The model.
        config: The run's config (model name and preprocessing).
        ema: The EMA model, if any.

    Returns:
        The files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "model.safetensors"]
    save_model_atomic(model, written[0])
    if ema is not None:
        written.append(folder / "model_ema.safetensors")
        save_model_atomic(ema, written[-1])
    if config.model.convert:  # no timm constructor rebuilds a converted model
        (folder / "config.json").unlink(missing_ok=True)
        return written
    try:
        with replacing(folder / "config.json") as temporary:
            _write_config(temporary, model, config)
    # a constructor argument JSON cannot hold (a class, a function), or a timm without this helper
    except (ValueError, TypeError, ImportError) as error:
        logger.warning(f"{folder}: no config.json, as timm cannot describe this model ({error}); load the "
                       "weights with python -m vitblocks.eval or the recipe")
        (folder / "config.json").unlink(missing_ok=True)
        return written
    written.append(folder / "config.json")
    return written


def _write_config(path: str, model: nn.Module, config: TrainConfig) -> None:
    """timm's config.json of the model, describing this run's weights and preprocessing."""
    from timm.models._hub import save_config_for_hf  # save_for_hf's config half (its weights write is not atomic)

    save_config_for_hf(model, path, model_args=model_args(config))
    settings = json.loads(Path(path).read_text())
    cfg = settings["pretrained_cfg"]
    for key in ("origin_url", "paper_name", "paper_ids", "notes", "license", "hf_hub_id", "url", "file"):
        cfg.pop(key, None)  # those describe released weights, not these
    cfg.update(data_config(config), tag=Path(config.output_dir).name or "run", num_classes=config.data.num_classes)
    cfg.pop("test_input_size", None)
    cfg.pop("test_crop_pct", None)
    Path(path).write_text(json.dumps(settings, indent=2) + "\n")


def folder_incomplete(folder: str | Path, config: TrainConfig, ema: bool) -> bool:
    """Whether a model folder lacks a file `write_model_folder` writes, or holds an unreadable one.

    Args:
        folder: The folder.
        config: The run's config (a converted model has no config.json).
        ema: Whether the run keeps EMA weights.

    Returns:
        True when the folder should be written again.
    """
    from safetensors import safe_open

    folder = Path(folder)
    if not config.model.convert and not (folder / "config.json").is_file():
        return True
    for name in ("model.safetensors", "model_ema.safetensors")[: 1 + ema]:
        try:
            with safe_open(str(folder / name), "pt"):
                pass
        except Exception:  # noqa: BLE001 - missing, truncated or not safetensors: write it again
            return True
    return False
