"""Command line of the trainer.

    python -m vitblocks.train recipes/quickstart.py
    python -m vitblocks.train recipes/sret_pit.py --set data.root=/data/imagenet epochs=100
    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_pit.py --resume auto
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import vitblocks.train.process.distributed as distributed
from vitblocks.io import CheckpointError
from vitblocks.train.config.checks import check_names
from vitblocks.train.config.recipe import apply_overrides, format_config, load_recipe, smoke_config
from vitblocks.train.errors import (
    ConfigError,
    DataError,
    LoaderWorkerDied,
    StopRequested,
    TrainingDiverged,
    TrainingInterrupted,
)
from vitblocks.train.outputs.run_folder import RunFolder
from vitblocks.train.process.preemption import PREEMPTED_EXIT_CODE, StopSignals
from vitblocks.train.run.engine import Trainer


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
    parser.add_argument("--resume-changed", nargs="+", action="extend", default=[], metavar="FIELD",
                        help="with --resume: fields that may differ from the checkpoint's run on purpose (a resume "
                             "refuses a change of model, optimizer, data, classes, split, seed or image size "
                             "otherwise), e.g. data.img_size")
    parser.add_argument("--output-dir", help="override the recipe's output_dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in the output folder (without it such a folder is refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-all-ranks", action="store_true",
                        help="under torchrun, log from every process (default: the main process only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the process exit code.

    0: done; 2: bad input or a stopped run (the message says why and what to do);
    `PREEMPTED_EXIT_CODE` (75): stopped by a signal (SIGTERM, SIGINT, SIGUSR1, SIGHUP), or by
    a loader worker's death, after writing a checkpoint to continue from with
    `--resume auto` (before the first step: with nothing new trained); 130: a second
    Ctrl-C, which stops without a checkpoint.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    trainer, output_dir = None, None
    startup = StopSignals(at_once=True)  # until training starts a stop signal stops at once: no step to finish
    try:
        with startup:
            config = apply_overrides(load_recipe(args.recipe), args.set)
            if args.output_dir:
                config = apply_overrides(config, [f"output_dir={args.output_dir!r}"])
            if args.smoke:
                config = smoke_config(config)
            check_names(config)  # before anything is built or written, --print-config included
            output_dir = config.output_dir
            if args.print_config:
                print(format_config(config))
                return 0
            trainer = Trainer(config, overwrite=args.overwrite or args.smoke, log_all_ranks=args.log_all_ranks)
            if args.smoke:
                print(f"smoke test: {config.model.name} on synthetic data of the recipe's shape "
                      f"({config.data.img_size} px, {config.data.num_classes} classes), a few steps; "
                      f"writing to {trainer.output_dir}", flush=True)
            if args.resume:
                found = trainer.run_folder.resume_candidate() if args.resume == "auto" else Path(args.resume)
                if found is not None:
                    trainer.resume(found, allow_changes=args.resume_changed)
            elif args.resume_changed:
                raise ConfigError("--resume-changed names fields a resumed run may change; give it with --resume")
            startup.at_once = False  # from here a signal is recorded: fit stops after the step in progress
            trainer.fit(progress=not args.no_progress and sys.stderr.isatty())  # no bar in logs: one line per epoch
    except StopRequested as stop:
        kept = _checkpoint_kept(args.resume, output_dir)
        _say(f"{stop}; {f'{kept} is unchanged' if kept else 'no checkpoint was written'}. Continue with: "
             f"{_resume_command(argv)}", trainer)
        return PREEMPTED_EXIT_CODE
    except TrainingInterrupted as stop:
        _say(f"{stop}. Continue with: {_resume_command(argv)}", trainer)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        kept = trainer.last_good_checkpoint if trainer is not None else None
        _say(f"interrupted; stopped at once, without a checkpoint of this point. "
             f"{f'The last checkpoint is {kept}.' if kept else 'No checkpoint was written.'}")
        return 130
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, FileNotFoundError, OSError, ImportError,
            LoaderWorkerDied, distributed.StoppedElsewhere) as error:
        _say(f"error: {_message(error)}")
        return 2
    finally:
        distributed.teardown()
    return 0


def _checkpoint_kept(resume: str | None, output_dir: str | None) -> Path | None:
    """The checkpoint a run stopped during start-up would have continued from (None: it started afresh)."""
    if not resume or output_dir is None:
        return None
    if resume != "auto":
        return Path(resume)
    try:
        return RunFolder(output_dir).resume_candidate()
    except (CheckpointError, OSError):  # a link, no permission: say nothing of it rather than fail here
        return None


def _say(line: str, trainer: Trainer | None = None) -> None:
    """The run's last line, on standard error (given the trainer: from its main process only).

    A closed terminal (SIGHUP) is no error: the checkpoint is written and the exit code says the rest.
    """
    if trainer is not None and not trainer.runtime.is_main:
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _message(error: BaseException) -> str:
    """The error's text, or what it is about when it has none (a bare FileNotFoundError, say)."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the worker's own message is the last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    if isinstance(error, OSError) and (not text or text.startswith("[Errno")):
        text = f"{error.strerror or type(error).__name__}: {error.filename}" if error.filename else text
    return text or f"{type(error).__name__} (no message)"


def _resume_command(argv: list[str] | None) -> str:
    """The command line that continues this run: the same one, with --resume auto."""
    words = list(sys.argv[1:] if argv is None else argv)
    if "--resume" in words:
        at = words.index("--resume")
        del words[at : at + 2]
    words = [w for w in words if not w.startswith("--resume=")]
    return " ".join(["python -m vitblocks.train", *(shlex.quote(w) for w in words), "--resume auto"])


if __name__ == "__main__":
    sys.exit(main())
