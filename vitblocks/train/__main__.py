"""Command line of the trainer.

    python -m vitblocks.train recipes/quickstart.py
    python -m vitblocks.train recipes/sret_pit.py --set data.root=/data/imagenet epochs=100
    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_pit.py --resume auto
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import vitblocks.train.distributed as distributed
from vitblocks.io import CheckpointError
from vitblocks.train.callbacks import TrainingDiverged
from vitblocks.train.config import ConfigError, apply_overrides, format_config, load_recipe, smoke_config
from vitblocks.train.data import DataError
from vitblocks.train.engine import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the trainer's command line."""
    parser = argparse.ArgumentParser(prog="python -m vitblocks.train", description="Train a model from a recipe file.")
    parser.add_argument("recipe", help="path of a recipe file, e.g. recipes/quickstart.py")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config fields by dotted path, e.g. optim.lr=1e-3 epochs=5")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--smoke", action="store_true", help="a few steps on synthetic data of the recipe's shape")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue from a checkpoint; 'auto': OUTPUT_DIR/last.pth when it exists")
    parser.add_argument("--output-dir", help="override the recipe's output_dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in the output folder (without it such a folder is refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-all-ranks", action="store_true",
                        help="under torchrun, log from every process (default: the main process only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the process exit code."""
    args = parse_args(argv)
    try:
        config = apply_overrides(load_recipe(args.recipe), args.set)
        if args.output_dir:
            config = apply_overrides(config, [f"output_dir={args.output_dir!r}"])
        if args.smoke:
            config = smoke_config(config)
        if args.print_config:
            print(format_config(config))
            return 0
        trainer = Trainer(config, overwrite=args.overwrite or args.smoke, log_all_ranks=args.log_all_ranks)
        if args.smoke:
            print(f"smoke test: {config.model.name} on synthetic data of the recipe's shape "
                  f"({config.data.img_size} px, {config.data.num_classes} classes), a few steps; "
                  f"writing to {trainer.output_dir}", flush=True)
        if args.resume:
            last = Path(trainer.output_dir) / "last.pth"
            if args.resume != "auto":
                trainer.resume(args.resume)
            elif last.is_file():
                trainer.resume(last)
        trainer.fit(progress=not args.no_progress and sys.stderr.isatty())  # no bar in logs: one line per epoch
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
