"""Evaluate a trained checkpoint: top-1 / top-5 with the resize / center-crop protocol.

    python -m vitblocks.eval runs/sret_t_imagenet/best.pth --data /data/imagenet
    python -m vitblocks.eval runs/quickstart/best.pth            # the recipe's own data
    python -m vitblocks.eval runs/quickstart/best.pth --loops 3  # test-time depth

The images are resized to img_size / crop_pct (256 for 224) and center-cropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from vitblocks.io import CheckpointError, non_finite_tensors
from vitblocks.layers.depth import set_loops
from vitblocks.train.builders import build_data, build_model
from vitblocks.train.checkpoint import load_training_checkpoint
from vitblocks.train.config import ConfigError, apply_overrides, from_dict
from vitblocks.train.config import TrainConfig
from vitblocks.train.data import DataError, folder_classes
from vitblocks.train.engine import evaluate


WEIGHT_SOURCES = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
"""Model options that load weights from elsewhere; dropped when a model is rebuilt from a checkpoint."""


def check_classes(checkpoint: str, state: dict[str, Any], config: TrainConfig) -> list[str] | None:
    """Check that the data's classes are ones the checkpoint's model was trained on.

    Args:
        checkpoint: The checkpoint's path, for messages.
        state: The checkpoint.
        config: The config the data is built from.

    Returns:
        The checkpoint's class names in label order (None for checkpoints that predate
        stored class names).

    Raises:
        CheckpointError: If the data has classes the checkpoint lacks, or another class
            count than the checkpoint's model.
    """
    classes = state.get("classes") or None
    if config.data.dataset != "imagefolder":
        return classes
    root = Path(config.data.root)
    found = folder_classes(root / "val") or folder_classes(root / "train")
    if not found:
        return classes  # the dataset's own layout check explains what is missing
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise CheckpointError(
                f"the data at {root} has classes the checkpoint {checkpoint} was not trained on "
                f"({', '.join(unknown[:8])}); its {len(classes)} classes are {', '.join(classes[:8])}"
                f"{', ...' if len(classes) > 8 else ''}. Evaluate it on data of those classes."
            )
    elif len(found) != config.data.num_classes:
        raise CheckpointError(
            f"the checkpoint {checkpoint} holds a model with {config.data.num_classes} classes but the data at "
            f"{root} has {len(found)}; evaluate it on data of the classes it was trained on"
        )
    return classes


def run(checkpoint: str, data_root: str | None = None, overrides: list[str] | None = None, ema: bool = False,
        batch_size: int | None = None, loops: int | None = None) -> dict[str, float]:
    """Evaluate the weights of a trainer checkpoint on its validation data.

    Args:
        checkpoint: A `last.pth` / `best.pth` written by the trainer.
        data_root: ImageFolder root holding `val/` (switches the dataset to imagefolder).
        overrides: Config overrides, e.g. `["data.img_size=256"]`.
        ema: Use the EMA weights stored in the checkpoint.
        batch_size: Evaluation batch size.
        loops: Test-time depth: loops of every shared block (`vitblocks.layers.set_loops`);
            None keeps the trained count.

    Returns:
        `val_loss`, `val_top1`, `val_top5` (%).
    """
    state = load_training_checkpoint(checkpoint)
    stored = state["config"]
    # the weights come from the checkpoint itself: never follow file paths or downloads named in its config
    stored["model"]["kwargs"] = {k: v for k, v in stored["model"].get("kwargs", {}).items() if k not in WEIGHT_SOURCES}
    config = from_dict(stored)
    extra = list(overrides or [])
    if data_root:
        extra += ["data.dataset=imagefolder", f"data.root={data_root!r}"]
    if batch_size is not None:
        extra.append(f"data.batch_size={batch_size}")
    config = apply_overrides(config, extra)
    weights = state["ema"] if ema else state["model"]
    if weights is None:
        raise CheckpointError(f"{checkpoint} holds no EMA weights (the run had ema_decay=None)")
    broken = non_finite_tensors(weights)
    if broken:
        raise CheckpointError(
            f"the {'EMA ' if ema else ''}weights in {checkpoint} are not finite (NaN or infinity in {len(broken)} "
            f"tensors: {', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''}): the run had diverged when it "
            "was written. Evaluate an earlier checkpoint."
        )
    classes = check_classes(checkpoint, state, config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config, load_base=False)  # a converted model's base weights are not needed
    model.load_state_dict(weights)
    if loops is not None:
        set_loops(model, loops)
    try:
        data = build_data(config, train=False, classes=classes)
    except DataError as error:
        raise DataError(error.problem, "Give the dataset root with --data /path/to/dataset (it needs a val/ "
                                       "folder of class folders), or change the stored config with --set.") from None
    return evaluate(model.to(device), data.val_loader(config, device), device)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default: sys.argv).

    Returns:
        The exit code: 0, or 2 after an error message.
    """
    parser = argparse.ArgumentParser(prog="python -m vitblocks.eval", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint written by the trainer")
    parser.add_argument("--data", help="ImageFolder root with a val/ folder (default: the recipe's data)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--loops", type=int, metavar="N",
                        help="test-time depth: apply every shared block N times (default: as trained)")
    args = parser.parse_args(argv)
    try:
        metrics = run(args.checkpoint, args.data, args.set, args.ema, args.batch_size, args.loops)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  loss {metrics['val_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
