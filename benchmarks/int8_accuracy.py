"""Top-1 of the int8 export against the float model on the quickstart's validation split.

    python -m benchmarks.int8_accuracy                  # trains the quickstart first (about 30 s)
    python -m benchmarks.int8_accuracy --run runs/quickstart

Exports the run as `python -m vitblocks.export RUN --format int8` does (static int8,
torchao's PT2E quantizer for x86, calibrated on the run's validation images, compiled by
Inductor with weight freezing), then scores the eager float32 model and the int8 package
on every image of the validation split with its label. Writes `int8_accuracy.json` and
`int8_accuracy.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from vitblocks import export
from vitblocks.deploy.formats import load_artifact
from vitblocks.deploy.source import load_source
from vitblocks.train import Trainer, derive, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def labelled_validation(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every preprocessed image of a run's validation split, with its label."""
    images, labels = zip(*load_source(run).validation_batches())
    return torch.cat(images), torch.cat(labels)


def measure(run: Path, calibration_images: int) -> dict:
    """Export `run` to int8 and score it beside the float model."""
    with tempfile.TemporaryDirectory() as tmp:
        result = export.run(str(run), "int8", output=tmp, check_images=1024, calibration_count=calibration_images)
        int8 = load_artifact(result["artifact"], "int8")
        images, labels = labelled_validation(run)
        with torch.no_grad():
            float_top1 = result["source"].model(images).argmax(-1)
            int8_top1 = int8(images).argmax(-1)
    return {
        "images": len(labels),
        "calibration": result["calibration"],
        "float32_top1": round((float_top1 == labels).float().mean().item() * 100, 2),
        "int8_top1": round((int8_top1 == labels).float().mean().item() * 100, 2),
        "top1_agreement": round((float_top1 == int8_top1).float().mean().item() * 100, 2),
        "max_abs_logit_diff": round(result["check"]["max_abs_logit_diff"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run folder (default: train the quickstart first)")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "quickstart"
            Trainer(derive(load_recipe(ROOT / "recipes" / "quickstart.py"), output_dir=str(run))).fit(progress=False)
        row = measure(run, args.calibration_images)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    text = (f"int8 against float32 on the quickstart's validation split ({machine}).\n\n"
            "| images | float32 top-1 | int8 top-1 | difference (points) | top-1 agreement | max abs. logit diff |\n"
            "|---:|---:|---:|---:|---:|---:|\n"
            f"| {row['images']} | {row['float32_top1']}% | {row['int8_top1']}% | "
            f"{row['int8_top1'] - row['float32_top1']:+.2f} | {row['top1_agreement']}% | "
            f"{row['max_abs_logit_diff']} |\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_accuracy.md").write_text(text)
    (args.out / "int8_accuracy.json").write_text(json.dumps({"machine": machine, **row}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
