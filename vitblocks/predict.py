"""Top-k class names and probabilities for image files, from a run, a checkpoint, a model name or an export.

    python -m vitblocks.predict runs/quickstart photos/                     # eager, the run's best weights
    python -m vitblocks.predict runs/quickstart/export/model_int8.pt2 photos/*.png --topk 3 --out preds.csv
    python -m vitblocks.predict runs/quickstart/export/model.onnx a.jpg b.jpg --out preds.json

Images are named as files, folders (searched recursively) or glob patterns, decoded by
TorchCodec where it is installed (torchvision where not) and preprocessed as the model
was evaluated (resize, center crop, normalize: from the run, or from the export's
manifest). Exports run in onnxruntime (`.onnx`) or AOTInductor (`.pt2`) without the
model's code. Files that cannot be read are named and skipped.

Exit status: 0 when every image was predicted; otherwise the number of images that
could not be read (100 for 100 or more); 101 after an error that stops the command.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from vitblocks.deploy.errors import DeployError
from vitblocks.deploy.formats import MAX_BATCH, load_artifact, readable_by_others
from vitblocks.deploy.images import decoded_batches, list_images
from vitblocks.deploy.manifest import find_artifact, read_manifest
from vitblocks.deploy.preprocess import check_preprocessing
from vitblocks.deploy.source import load_source
from vitblocks.io import replacing
from vitblocks.train.data.decoders import image_decoder

FAILED = 101
"""The exit status after an error that stops the command (unreadable images count 1 to 100)."""

OUTPUT_SUFFIXES = (".csv", ".json")


@dataclass
class Predictor:
    """A model as prediction runs it.

    Attributes:
        run: A batch of preprocessed images to logits.
        preprocessing: timm's data-config keys (input_size, mean, std, crop_pct, interpolation).
        classes: Class names in label order.
        description: What runs, for the header line.
    """

    run: Callable[[torch.Tensor], torch.Tensor]
    preprocessing: dict[str, Any]
    classes: list[str]
    description: str


@dataclass
class Prediction:
    """The top-k classes of one image.

    Attributes:
        path: The image file.
        classes: Class names, most probable first.
        probabilities: Their softmax probabilities.
    """

    path: Path
    classes: list[str]
    probabilities: list[float]


def load_predictor(spec: str, ema: bool = False) -> Predictor:
    """Load what predicts: an export (its file or folder), or a run, checkpoint or model name run eagerly.

    Args:
        spec: The export, run folder, checkpoint or model name.
        ema: Use a checkpoint's EMA weights (eager only).

    Returns:
        The predictor.

    Raises:
        DeployError: If `spec` names nothing that predicts, or `ema` is asked of an export.
    """
    artifact = find_artifact(spec)
    if artifact is not None:
        if ema:
            raise DeployError(f"--ema chooses a checkpoint's weights; {artifact} holds the weights it was exported "
                              "with (export with --ema for the EMA weights)")
        manifest = read_manifest(artifact)
        batch = None if manifest["batch"] == "dynamic" else manifest["batch"]
        return Predictor(load_artifact(artifact, manifest["format"], batch), manifest, list(manifest["classes"]),
                         f"{artifact} ({manifest['format']}, {manifest.get('model', 'model')})")
    source = load_source(spec, ema)
    check_preprocessing(source.preprocessing)

    def eager(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return source.model(images)

    return Predictor(eager, source.preprocessing, source.classes, f"{source.origin} ({source.name}, eager)")


def predict(predictor: Predictor, paths: Sequence[Path], topk: int = 5, batch_size: int = 32
            ) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Predict the top-k classes of image files.

    Args:
        predictor: The model.
        paths: The files.
        topk: Classes per image.
        batch_size: Images per model call.

    Returns:
        The predictions, in the order of `paths`, and the files skipped with why.
    """
    predictions, skipped = [], []
    for good, images, bad in decoded_batches(list(paths), predictor.preprocessing, batch_size):
        skipped += bad
        if not good:
            continue
        try:
            logits = predictor.run(images)
        except Exception as error:  # noqa: BLE001 - runtimes (onnxruntime, AOTInductor) raise their own types
            raise DeployError(f"{predictor.description} failed on a batch of {len(images)} images: "
                              f"{type(error).__name__}: {' '.join(str(error).split())[:200]}") from None
        if logits.shape[-1] != len(predictor.classes):
            raise DeployError(f"{predictor.description} gives {logits.shape[-1]} logits per image but names "
                              f"{len(predictor.classes)} classes: export the model again")
        probabilities = logits.float().softmax(-1)
        top = probabilities.topk(topk, dim=-1)
        for path, values, indices in zip(good, top.values.tolist(), top.indices.tolist()):
            predictions.append(Prediction(path, [predictor.classes[i] for i in indices], values))
    return predictions, skipped


def write_predictions(predictions: Sequence[Prediction], path: Path) -> None:
    """Write predictions as CSV (a header, then a row per image) or JSON (a list), by the file's suffix.

    Args:
        predictions: The predictions.
        path: A `.csv` or `.json` file (replaced whole).

    Raises:
        OSError: If the file cannot be written.
    """
    topk = max((len(p.classes) for p in predictions), default=0)
    with replacing(path) as tmp, open(tmp, "w", newline="") as handle:
        if path.suffix == ".json":
            json.dump([{"path": str(p.path), "top": [{"class": c, "probability": round(v, 6)}
                                                     for c, v in zip(p.classes, p.probabilities)]}
                       for p in predictions], handle, indent=1)
        else:
            writer = csv.writer(handle)
            writer.writerow(["path"] + [f"top{i}{part}" for i in range(1, topk + 1) for part in ("", "_probability")])
            for p in predictions:
                writer.writerow([str(p.path)]
                                + [x for c, v in zip(p.classes, p.probabilities) for x in (c, f"{v:.6f}")])
    readable_by_others(path)


def check_output(path: Path) -> None:
    """Refuse, before any image is read, an output file that cannot be written.

    Args:
        path: The `--out` file.

    Raises:
        DeployError: For another suffix than .csv or .json, a folder, or a missing folder around it.
    """
    if path.suffix not in OUTPUT_SUFFIXES:
        raise DeployError(f"--out {path}: write predictions to a .csv or .json file")
    if path.is_dir():
        raise DeployError(f"--out {path} is a folder: name a file in it, e.g. {path / ('predictions' + path.suffix)}")
    if not path.absolute().parent.is_dir():
        raise DeployError(f"--out {path}: the folder {path.absolute().parent} does not exist; create it first")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # a usage error must not read as "2 images unreadable"
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(FAILED)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default: sys.argv).

    Returns:
        The exit status: 0, the number of unreadable images (at most 100), or 101 after an error.
    """
    parser = _Parser(prog="python -m vitblocks.predict", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an export (.pt2 / .onnx file, or its folder), a run folder, a trainer "
                                      "checkpoint, or a registered model name")
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the predictions to a .csv or .json file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ema", action="store_true", help="a checkpoint's EMA weights")
    args = parser.parse_args(argv)
    try:
        if args.out is not None:
            check_output(args.out)
        if not 1 <= args.batch_size <= MAX_BATCH:
            raise DeployError(f"--batch-size must be between 1 and {MAX_BATCH}, got {args.batch_size}")
        found = list_images(args.images)
        if not found.paths:
            raise DeployError("no image files found in " + ", ".join(f"{spec} ({why})" for spec, why in found.missing))
        predictor = load_predictor(args.model, args.ema)
        if not 1 <= args.topk <= len(predictor.classes):
            raise DeployError(f"--topk must be between 1 and the model's {len(predictor.classes)} classes, "
                              f"got {args.topk}")
        count = len(found.paths)
        print(f"predicting {count} image{'' if count == 1 else 's'} with {predictor.description}; decoding with "
              f"{image_decoder().name}")
        predictions, skipped = predict(predictor, found.paths, args.topk, args.batch_size)
    except (DeployError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return FAILED
    skipped = [(Path(spec), why) for spec, why in found.missing] + skipped
    for path, why in skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if args.out is not None:
        try:
            write_predictions(predictions, args.out)
        except OSError as error:
            print(f"error: the predictions cannot be written to {args.out}: {error.strerror or error}",
                  file=sys.stderr)
            return FAILED
        print(f"{len(predictions)} predictions written to {args.out}")
    else:
        for p in predictions:
            print(f"{p.path}  " + "  ".join(f"{c} {v:.3f}" for c, v in zip(p.classes, p.probabilities)))
    if skipped:
        print(f"{len(skipped)} of {len(skipped) + len(predictions)} images could not be read (named above)",
              file=sys.stderr)
    return min(len(skipped), 100)


if __name__ == "__main__":
    sys.exit(main())
