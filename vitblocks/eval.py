"""Evaluate a trained checkpoint: top-1 / top-5 with the resize / center-crop protocol.

    python -m vitblocks.eval runs/sret_t_imagenet/best.pth --data /data/imagenet
    python -m vitblocks.eval runs/quickstart/best.pth            # the recipe's own data
    python -m vitblocks.eval runs/quickstart/best.pth --loops 3  # test-time depth
    python -m vitblocks.eval runs/sret_t_exit/best.pth --exit-threshold 0.9  # early exit

The images are resized to img_size / crop_pct (256 for 224) and center-cropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from vitblocks.attention import attention_backend
from vitblocks.io import CheckpointError, non_finite_tensors
from vitblocks.layers.depth import set_loops
from vitblocks.layers.early_exit import EarlyExit, set_exit_threshold
from vitblocks.models.create import create_model_at_size
from vitblocks.train.config.checks import WEIGHT_SOURCES
from vitblocks.train.config.recipe import apply_overrides, from_dict, literal_value
from vitblocks.train.config.schema import TrainConfig
from vitblocks.train.data.datasets import folder_classes, split_folder
from vitblocks.train.data.image_folder import class_order
from vitblocks.train.errors import ConfigError, DataError, LoaderWorkerDied
from vitblocks.train.outputs.checkpoint import load_training_checkpoint
from vitblocks.train.outputs.foreign_checkpoint import ForeignCheckpoint, read_foreign_checkpoint
from vitblocks.train.process.logs import console_logging, listed, logger
from vitblocks.train.run.builders import build_data, build_model
from vitblocks.train.run.evaluation import evaluate
from vitblocks.train.run.precision import autocast_for


def check_classes(checkpoint: str, state: dict[str, Any], config: TrainConfig) -> list[str] | None:
    """Check that the data's classes are ones the checkpoint's model was trained on.

    Labels follow the checkpoint's own class list when it stores one (vitblocks
    checkpoints do), so a checkpoint written when classes were numbered in plain string
    order (c1, c10, c2, ...) still scores correctly; a note says so. Weights without a class
    list (timm's train.py, a state dict) are read by timm's rule: the training split's
    classes in natural order, or the validation split's when there is no training split.

    Args:
        checkpoint: The checkpoint's path, for messages.
        state: The checkpoint.
        config: The config the data is built from.

    Returns:
        The checkpoint's class names in label order (None for weights without them: the
        data's own order is used).

    Raises:
        CheckpointError: If the data has classes the checkpoint lacks, or another class
            count than the checkpoint's model.
    """
    classes = state.get("classes") or None
    if config.data.dataset != "imagefolder":
        return classes
    root = Path(config.data.root)
    val, train = folder_classes(split_folder(root, "val")), folder_classes(split_folder(root, "train"))
    if not (val or train):
        return classes  # the dataset's own layout check explains what is missing
    if classes is not None:
        unknown = sorted(set(val or train) - set(classes))
        if unknown:
            raise CheckpointError(
                f"the data at {root} has classes the checkpoint {checkpoint} was not trained on "
                f"({', '.join(unknown[:8])}); its {len(classes)} classes are {', '.join(classes[:8])}"
                f"{', ...' if len(classes) > 8 else ''}. Evaluate it on data of those classes."
            )
        natural = sorted(classes, key=class_order)
        if classes != natural:
            logger.warning(f"note: labels follow the class order stored in {checkpoint} ({listed(classes)}), not "
                           f"the natural order vitblocks and timm number classes by now ({listed(natural)}): the "
                           "model is scored on the labels it was trained with")
        return classes
    if state and sorted(train or val) != (train or val):  # a vitblocks checkpoint from before class names were stored
        logger.warning(f"note: {checkpoint} stores no class names (it predates them); labels follow today's natural "
                       f"order ({listed(train or val)}), while a run of that age numbered classes in plain string "
                       f"order ({listed(sorted(train or val))}): if it was trained so, its scores are not comparable")
    if train and len(train) != config.data.num_classes:
        raise CheckpointError(
            f"the checkpoint {checkpoint} holds a model with {config.data.num_classes} classes but the training split "
            f"{split_folder(root, 'train')} has {len(train)}; evaluate it on data of the classes it was trained on")
    if not train and len(val) != config.data.num_classes:
        raise CheckpointError(
            f"the checkpoint {checkpoint} holds a model with {config.data.num_classes} classes but the data at {root} "
            f"has {len(val)} and no training split: which classes the labels skip cannot be known. Put the train/ "
            "folder beside val/ (labels follow its classes), or evaluate on data of every class")
    return classes


def foreign_config(checkpoint: ForeignCheckpoint, model: str, model_kwargs: dict[str, Any], data_root: str | None,
                   path: str) -> TrainConfig:
    """An evaluation config for weights that came without one (timm's train.py, a state dict).

    The class count, input size, normalization and crop come from the writer's `args`
    (timm's names) when it has them, else from the weights (the classifier's rows) and the
    model's own pretrained config.

    Args:
        checkpoint: The weights and args.
        model: The timm model name.
        model_kwargs: `timm.create_model` arguments.
        data_root: The ImageFolder root to evaluate on.
        path: The checkpoint's path, for messages.

    Returns:
        The config.

    Raises:
        ConfigError: If there is no data root, or the model cannot be built.
    """
    if not data_root:
        raise ConfigError(f"{path} holds weights without a vitblocks config: "
                          "give the data with --data /path/to/dataset")
    args, kwargs = checkpoint.args, dict(model_kwargs)
    for key in WEIGHT_SOURCES:
        kwargs.pop(key, None)
    try:
        with torch.device("meta"):
            probe = create_model_at_size(model, **kwargs)  # an img_size among them is passed as the keyword
    except (RuntimeError, ValueError, TypeError) as error:  # unknown name or arguments
        raise ConfigError(f"--model {model} with --model-kwargs {kwargs} cannot be built: {error}") from None
    defaults = probe.pretrained_cfg
    classifier = f"{defaults.get('classifier', 'head')}.weight"
    num_classes = kwargs.pop("num_classes", None) or args.get("num_classes")
    if not num_classes and classifier in checkpoint.weights:
        num_classes = checkpoint.weights[classifier].shape[0]
    input_size = args.get("input_size") or defaults.get("input_size", (3, 224, 224))
    img_size = kwargs.pop("img_size", None) or args.get("img_size") or input_size[-1]
    data = {"dataset": "imagefolder", "root": data_root,
            "img_size": int(img_size if not isinstance(img_size, (list, tuple)) else img_size[-1]),
            "num_classes": int(num_classes or defaults.get("num_classes", 1000)),
            "mean": tuple(args.get("mean") or defaults.get("mean")),
            "std": tuple(args.get("std") or defaults.get("std")),
            "crop_pct": float(args.get("crop_pct") or defaults.get("crop_pct", 0.875)),
            "interpolation": args.get("interpolation") or defaults.get("interpolation", "bicubic")}
    return from_dict({"model": {"name": model, "kwargs": kwargs}, "data": data, "output_dir": str(Path(path).parent)})


def run(checkpoint: str, data_root: str | None = None, overrides: list[str] | None = None, ema: bool = False,
        batch_size: int | None = None, loops: int | None = None, model: str | None = None,
        model_kwargs: dict[str, Any] | None = None, exit_threshold: float | None = None) -> dict[str, float]:
    """Evaluate the weights of a checkpoint on validation data.

    Args:
        checkpoint: A `last.pth` / `best.pth` written by the trainer; with `model`, also a
            timm train.py checkpoint (`model_best.pth.tar`), a bare state dict or a
            `.safetensors` file.
        data_root: ImageFolder root holding `val/` (or `validation/`; switches the dataset
            to imagefolder).
        overrides: Config overrides, e.g. `["data.img_size=256"]`. The model runs with the
            attention backend (`model.backend`) and precision of the run, or those set here
            (fp16 runs in fp32 on a machine without CUDA, saying so).
        ema: Use the EMA weights stored in the checkpoint.
        batch_size: Evaluation batch size.
        loops: Test-time depth: loops of every shared block (`vitblocks.layers.set_loops`);
            None keeps the trained count.
        model: The timm model name of weights that come without a vitblocks config.
        model_kwargs: Its `timm.create_model` arguments.
        exit_threshold: Early exit: the top softmax probability at which an image stops
            (`vitblocks.layers.set_exit_threshold`; the model must have been built with
            `early_exit=`); None keeps the model's.

    Returns:
        `val_loss`, `val_top1`, `val_top5` (%); with exits that stop images, also
        `applications` (mean block applications per image in the stage with the exits)
        and `positions` (all of them).

    Raises:
        CheckpointError: If the file cannot be read, or is another trainer's without `model`.
        ConfigError: If the config or the model cannot be built.
    """
    if model is not None:
        foreign = read_foreign_checkpoint(checkpoint, ema)
        config = apply_overrides(foreign_config(foreign, model, model_kwargs or {}, data_root, checkpoint),
                                 list(overrides or []) + ([f"data.batch_size={batch_size}"] if batch_size else []))
        return _evaluate(config, foreign.weights, checkpoint, {}, loops, exit_threshold)
    state = trainer_checkpoint(checkpoint)
    extra = list(overrides or [])
    if data_root:
        extra += ["data.dataset=imagefolder", f"data.root={data_root!r}"]
    if batch_size is not None:
        extra.append(f"data.batch_size={batch_size}")
    config = apply_overrides(stored_config(state), extra)
    return _evaluate(config, checkpoint_weights(state, checkpoint, ema), checkpoint, state, loops, exit_threshold)


def stored_config(state: dict[str, Any]) -> TrainConfig:
    """The config a trainer checkpoint was written with, without the weight sources it names.

    The weights come from the checkpoint itself: file paths or downloads named in its
    config (`pretrained`, `checkpoint_path`, ...) are never followed.

    Args:
        state: The checkpoint.

    Returns:
        The config.
    """
    stored = state["config"]
    stored["model"]["kwargs"] = {k: v for k, v in stored["model"].get("kwargs", {}).items() if k not in WEIGHT_SOURCES}
    return from_dict(stored)


def checkpoint_weights(state: dict[str, Any], checkpoint: str, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model's (or the EMA's) weights in a trainer checkpoint, checked to be finite.

    Args:
        state: The checkpoint.
        checkpoint: Its path, for messages.
        ema: Take the EMA weights.

    Returns:
        The weights.

    Raises:
        CheckpointError: If there are no EMA weights, or the weights hold NaN or infinity.
    """
    weights = state["ema"] if ema else state["model"]
    if weights is None:
        raise CheckpointError(f"{checkpoint} holds no EMA weights (the run had ema_decay=None)")
    broken = non_finite_tensors(weights)
    if broken:
        raise CheckpointError(
            f"the {'EMA ' if ema else ''}weights in {checkpoint} are not finite (NaN or infinity in {len(broken)} "
            f"tensors: {', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''}): the run had diverged when it "
            "was written. Use an earlier checkpoint."
        )
    return weights


def trainer_checkpoint(path: str) -> dict[str, Any]:
    """Read a trainer checkpoint; another trainer's file gets an error saying how to evaluate it.

    Args:
        path: A `last.pth` / `best.pth`.

    Returns:
        The checkpoint.

    Raises:
        CheckpointError: If it cannot be read, or is another trainer's (naming `--model`).
        FileNotFoundError: If it does not exist.
    """
    try:
        return load_training_checkpoint(path)
    except CheckpointError as error:
        try:
            foreign = read_foreign_checkpoint(path)
        except (CheckpointError, FileNotFoundError):
            raise error from None
        kind = "a timm train.py checkpoint" if foreign.args or foreign.source != "the file" else "a bare state dict"
        raise CheckpointError(f"{path} is {kind}, not a vitblocks training checkpoint, so it holds no config to "
                              "build the model from: name it with --model NAME (and --model-kwargs KEY=VALUE ... for a "
                              "model of other widths), and give the data with --data /path/to/dataset") from None


def _evaluate(config: TrainConfig, weights: dict[str, torch.Tensor], checkpoint: str, state: dict[str, Any],
              loops: int | None, exit_threshold: float | None = None) -> dict[str, float]:
    classes = check_classes(checkpoint, state, config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = trained_model(config, weights, checkpoint)
    if loops is not None:
        set_loops(model, loops)
    if exit_threshold is not None:
        set_exit_threshold(model, exit_threshold)
    exits = [m for m in model.modules() if isinstance(m, EarlyExit)]
    try:
        data = build_data(config, train=False, classes=classes)
    except DataError as error:
        raise DataError(error.problem, "Give the dataset root with --data /path/to/dataset (it needs a val/ "
                                       "folder of class folders), or change the stored config with --set.") from None
    logger.info(f"scoring {config.model.name} on {len(data.val_set)} images: {validation_data(config)}")
    precision = config.precision
    if precision == "fp16" and device.type != "cuda":
        logger.info("the run's precision fp16 needs a CUDA device: evaluating in fp32 (--set precision=bf16 for bf16)")
        precision = "fp32"
    with attention_backend(config.model.backend):  # the run's backend and precision, or those given with --set
        metrics = evaluate(model.to(device), data.val_loader(device), device, autocast_for(precision, device.type),
                           max_unreadable=config.data.max_bad_images)
    counted = [m for m in exits if m.positions_run() is not None]
    if counted:
        metrics.update(applications=counted[-1].positions_run(), positions=counted[-1].positions)
    return metrics


def validation_data(config: TrainConfig) -> str:
    """Which data and split a config's validation images come from, for the evaluation's report.

    Args:
        config: The config the data is built from.

    Returns:
        E.g. "the validation split (20%) of scikit-learn's digits" or a folder's path.

    Examples:
        >>> from vitblocks.train import DataConfig, TrainConfig
        >>> validation_data(TrainConfig(data=DataConfig(dataset="digits", val_fraction=0.2)))
        "the validation split (20%) of scikit-learn's digits"
    """
    data = config.data
    if data.dataset == "digits":
        return f"the validation split ({data.val_fraction:.0%}) of scikit-learn's digits"
    if data.dataset == "synthetic":
        return "synthetic validation images"
    if data.dataset == "imagefolder":
        return f"the validation split {split_folder(Path(data.root), 'val')}"
    return f"the validation split of {data.dataset} at {data.root}"


def trained_model(config: TrainConfig, weights: dict[str, torch.Tensor], checkpoint: str) -> torch.nn.Module:
    """Build a run's model and load its weights.

    Args:
        config: The run's config.
        weights: Its weights (the model's or the EMA's).
        checkpoint: Where they came from, for messages.

    Returns:
        The model, on the CPU, in the mode it was built in.

    Raises:
        CheckpointError: If the weights do not fit the model the config builds.
    """
    model = build_model(config, load_base=False)  # a converted model's base weights are not needed
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:500]
        raise CheckpointError(f"the weights in {checkpoint} do not fit {config.model.name} with {config.model.kwargs} "
                              f"({detail}); give the model's arguments with --model-kwargs "
                              "(e.g. embed_dim=...)") from None
    return model


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default: sys.argv).

    Returns:
        The exit code: 0, or 2 after an error message.
    """
    parser = argparse.ArgumentParser(prog="python -m vitblocks.eval", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint written by the trainer (with --model: also timm's "
                                           "train.py checkpoints, state dicts, .safetensors)")
    parser.add_argument("--data", help="ImageFolder root with a val/ folder (default: the recipe's data)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--loops", type=int, metavar="N",
                        help="test-time depth: apply every shared block N times (default: as trained)")
    parser.add_argument("--exit-threshold", type=float, metavar="P",
                        help="early exit: an image stops once its top softmax probability reaches P (a model built "
                             "with early_exit=; above 1: none stops)")
    parser.add_argument("--model", help="timm model name, for a checkpoint without a vitblocks config (timm's "
                                        "train.py, a state dict)")
    parser.add_argument("--model-kwargs", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="its timm.create_model arguments, e.g. embed_dims=(32,64,128)")
    args = parser.parse_args(argv)
    console_logging()  # notes (a checkpoint's own class order, files that cannot be read) on standard output
    try:
        kwargs = parse_kwargs(args.model_kwargs)
        metrics = run(args.checkpoint, args.data, args.set, args.ema, args.batch_size, args.loops, args.model, kwargs,
                      args.exit_threshold)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError, ValueError, LoaderWorkerDied) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    unreadable = metrics.get("val_unreadable")
    print(f"top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  loss {metrics['val_loss']:.4f}"
          + (f"  ({unreadable} validation images cannot be read and were not scored: named above)" if unreadable
             else ""))
    if "applications" in metrics:
        print(f"early exit: {metrics['applications']:.2f} of {metrics['positions']} block applications per image "
              "in the last stage, on average")
    return 0


def parse_kwargs(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` arguments as a dict, values read as Python literals (bare words are strings).

    Args:
        items: E.g. `["embed_dims=(32,64,128)", "global_pool=avg"]`.

    Returns:
        E.g. `{"embed_dims": (32, 64, 128), "global_pool": "avg"}`.

    Raises:
        ConfigError: For an item without `=`.
    """
    parsed = {}
    for item in items:
        key, equals, raw = item.partition("=")
        if not equals or not key:
            raise ConfigError(f"--model-kwargs {item!r} is not KEY=VALUE")
        parsed[key.strip()] = literal_value(raw)
    return parsed


if __name__ == "__main__":
    sys.exit(main())
