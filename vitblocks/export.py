"""Export a trained run (or a registered model) to ONNX, an AOTInductor package, or an int8 package.

    python -m vitblocks.export runs/quickstart --format pt2            # runs/quickstart/export/model.pt2
    python -m vitblocks.export runs/quickstart --format int8           # calibrated on the run's images
    python -m vitblocks.export runs/quickstart/best.pth --format onnx --batch 8 --output deploy/
    python -m vitblocks.export sret_t --format pt2                     # random weights: timing, smoke tests

Each artifact is written beside its manifest (`model.pt2.json`: model, input size, mean,
std, class names, versions) and checked against the eager model on the run's validation
images: the largest logit difference and the top-1 agreement are printed and kept in the
manifest. `python -m vitblocks.predict` runs it on image files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vitblocks.deploy.errors import DeployError
from vitblocks.deploy.formats import (
    FORMATS,
    MAX_BATCH,
    OTHER_FORMAT,
    check_exportable,
    check_format,
    export_model,
    load_artifact,
)
from vitblocks.deploy.images import decoded_batches, list_images
from vitblocks.deploy.manifest import compare, manifest_path, write_manifest
from vitblocks.deploy.source import Source, load_source
from vitblocks.layers.early_exit import set_exit_threshold


def default_output(spec: str) -> Path:
    """Where an export goes unless told: a run's `export/` folder, or `export/NAME` for a model name.

    Args:
        spec: The run folder, checkpoint or model name exported.

    Returns:
        The folder.
    """
    path = Path(spec)
    if path.is_dir():
        return path / "export"
    if path.is_file():
        return path.parent / "export"
    return Path("export") / spec


def calibration_images(source: Source, count: int, folder: str | None) -> tuple[list[torch.Tensor], str]:
    """The images int8 calibrates on: a folder's, or the run's validation images.

    Args:
        source: What is exported.
        count: How many images at most.
        folder: A folder (or file, or glob) of images; None takes the source's.

    Returns:
        Batches of preprocessed images, and where they came from.

    Raises:
        DeployError: If the folder holds no readable image.
    """
    if folder is None:
        images, origin = source.images(count, seed=1)
        return list(images.split(32)), origin
    found = list_images([folder])
    batches = [images for _, images, _ in decoded_batches(found.paths[:count], source.preprocessing, 32)]
    batches = [b for b in batches if len(b)]
    if not batches:
        raise DeployError(f"--calibration {folder} holds no image that can be read: give a folder of the images "
                          "the model will see")
    return batches, f"{sum(len(b) for b in batches)} images from {folder}"


def run(spec: str, fmt: str, output: str | None = None, batch: int | None = None, img_size: int | None = None,
        ema: bool = False, check_images: int = 64, calibration_count: int = 256,
        calibration_folder: str | None = None, exit_threshold: float | None = None) -> dict:
    """Export one model to one format, check it against eager, and write its manifest.

    Args:
        spec: A run folder, a trainer checkpoint, or a registered model name.
        fmt: One of `vitblocks.deploy.FORMATS`.
        output: The folder to write into (default: `default_output`).
        batch: A fixed batch size (None: dynamic, 1 to 1024).
        img_size: Export at another image size (a model name only: a run's position
            embedding is fixed to its own size).
        ema: Export a checkpoint's EMA weights.
        check_images: Images to compare the artifact with eager on.
        calibration_count: int8: images to calibrate on.
        calibration_folder: int8: calibrate on these image files instead of the run's.
        exit_threshold: Set a model's early-exit threshold first (above 1: full depth).

    Returns:
        What was written and measured: `artifact`, `manifest`, `seconds`, `check`, and
        for int8 `calibration`.

    Raises:
        DeployError: For anything that cannot be exported as asked (before any file is
            written), or an artifact that is written but does not run (it is removed).
    """
    check_format(fmt)  # before the model is read
    if batch is not None and not 1 <= batch <= MAX_BATCH:
        raise DeployError(f"--batch must be 'dynamic' or a batch size from 1 to {MAX_BATCH}, got {batch}")
    if check_images < 1 or calibration_count < 1:
        raise DeployError("--check-images and --calibration-images must be >= 1")
    source = load_source(spec, ema)
    if img_size is not None and img_size != source.img_size:
        source = _at_size(source, spec, img_size)
    if exit_threshold is not None:
        set_exit_threshold(source.model, exit_threshold)
    check_exportable(source.model, fmt)
    folder = Path(output) if output else default_output(spec)
    # the run's images after those int8 calibrates on when it takes the run's own (where the split holds
    # enough), read first: the calibration images then come from the same read of the split
    own_calibration = fmt == "int8" and calibration_folder is None
    images, origin = source.images(check_images, skip=calibration_count if own_calibration else 0)
    calibration = None
    batches: list[torch.Tensor] = []
    if fmt == "int8":
        batches, calibration_origin = calibration_images(source, calibration_count, calibration_folder)
        calibration = {"images": sum(len(b) for b in batches), "data": calibration_origin}
    example = torch.randn(batch or 2, *source.preprocessing["input_size"])
    target = folder / FORMATS[fmt]
    manifest_path(target).unlink(missing_ok=True)  # a new artifact never sits beside the last one's manifest
    started = time.perf_counter()
    artifact = export_model(source.model, fmt, target, example, dynamic=batch is None, calibration=batches)
    seconds = time.perf_counter() - started
    try:
        check = {"images": len(images), "data": origin,
                 **compare(source.model, load_artifact(artifact, fmt, batch), images, batch or 32)}
    except Exception as error:  # noqa: BLE001 - the runtimes' own error types
        artifact.unlink()
        message = error if isinstance(error, DeployError) else f"{type(error).__name__}: {error}"
        raise DeployError(f"the {fmt} artifact was written but does not run ({message}); it is removed. "
                          f"Try --format {OTHER_FORMAT[fmt]}") from None
    manifest = write_manifest(artifact, fmt, source, batch, check, calibration)
    return {"source": source, "artifact": artifact, "manifest": manifest, "seconds": seconds, "check": check,
            "calibration": calibration}


def _at_size(source: Source, spec: str, img_size: int) -> Source:
    if source.config is not None:
        raise DeployError(f"--img-size {img_size}: the run was trained at {source.img_size} px and its weights hold "
                          f"that size (position embeddings); export it at {source.img_size} (leave out --img-size), "
                          "or fine-tune it at the new size first")
    from vitblocks.models.create import create_model_at_size

    model = create_model_at_size(source.name, img_size=img_size).eval()
    preprocessing = dict(source.preprocessing, input_size=(3, img_size, img_size))
    return Source(model, source.name, f"{source.origin}, {img_size} px", preprocessing, source.classes)


def parse_batch(text: str) -> int | None:
    """`--batch`: "dynamic" or a size.

    Args:
        text: The argument.

    Returns:
        None for dynamic, else the size.

    Raises:
        argparse.ArgumentTypeError: For anything else.
    """
    if text == "dynamic":
        return None
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'dynamic' or a batch size, got {text!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"a batch size must be >= 1, got {size}")
    return size


def positive(text: str) -> int:
    """An image count argument: a whole number >= 1.

    Args:
        text: The argument.

    Returns:
        The number.

    Raises:
        argparse.ArgumentTypeError: For anything else.
    """
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {count}")
    return count


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default: sys.argv).

    Returns:
        The exit code: 0, or 2 after an error message.
    """
    parser = argparse.ArgumentParser(prog="python -m vitblocks.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a run folder, a trainer checkpoint (best.pth, last.pth), or a registered "
                                       "model name (random weights)")
    parser.add_argument("--format", required=True, choices=list(FORMATS), dest="fmt",
                        help="onnx (onnxruntime), pt2 (AOTInductor package), int8 (static int8 AOTInductor package "
                             "for x86 CPUs, torchao)")
    parser.add_argument("--output", metavar="DIR", help="folder to write into (default: RUN/export, or export/NAME "
                                                        "for a model name)")
    parser.add_argument("--batch", type=parse_batch, default=None, metavar="dynamic|N",
                        help="a dynamic batch (1 to 1024, the default) or a fixed one")
    parser.add_argument("--img-size", type=int, metavar="S", help="export a model name at another image size")
    parser.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    parser.add_argument("--check-images", type=positive, default=64, metavar="N",
                        help="images to compare the artifact with eager on (default 64)")
    parser.add_argument("--calibration-images", type=positive, default=256, metavar="N",
                        help="int8: images to calibrate on (default 256, from the run's validation split)")
    parser.add_argument("--calibration", metavar="DIR", help="int8: calibrate on these image files instead")
    parser.add_argument("--exit-threshold", type=float, metavar="P",
                        help="a model with early exits: set the threshold (above 1 exports the full-depth model)")
    args = parser.parse_args(argv)
    try:
        result = run(args.source, args.fmt, args.output, args.batch, args.img_size, args.ema, args.check_images,
                     args.calibration_images, args.calibration, args.exit_threshold)
    except (DeployError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    source, artifact, check = result["source"], result["artifact"], result["check"]
    size = artifact.stat().st_size / 2**20
    print(f"exported {source.origin} ({source.name}, {source.img_size} px, batch "
          f"{args.batch or 'dynamic'}) as {args.fmt}: {artifact} ({size:.1f} MiB) in {result['seconds']:.1f} s")
    if result["calibration"]:
        print(f"calibrated on {result['calibration']['images']} images: {result['calibration']['data']}")
    print(f"checked against eager on {check['images']} images ({check['data']}): max |logit difference| "
          f"{check['max_abs_logit_diff']:.2g}, top-1 agreement {check['top1_agreement']:.1%}")
    print(f"manifest: {result['manifest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
