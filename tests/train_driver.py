"""Runs a tiny training job in its own process, for tests that kill or distribute it.

    python tests/train_driver.py OUTPUT_DIR [--kill-at-step N] [--resume] [--save-rank-weights]
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import tiny_config  # noqa: E402

from vitblocks.train import Callback, Trainer, default_callbacks  # noqa: E402
from vitblocks.train import distributed  # noqa: E402
from vitblocks.train.preemption import PREEMPTED_EXIT_CODE, TrainingInterrupted  # noqa: E402


class SignalAtStep(Callback):
    def __init__(self, step, rank, number):
        self.step, self.rank, self.number = step, rank, number

    def on_step_end(self, trainer):
        if trainer.state.step == self.step and trainer.runtime.rank == self.rank:
            os.kill(os.getpid(), self.number)


class SignalWhileEvaluating(Callback):
    def __init__(self, epoch, rank, number):
        self.epoch, self.rank, self.number = epoch, rank, number

    def on_epoch_end(self, trainer, row):
        if row["epoch"] == self.epoch and trainer.runtime.rank == self.rank:
            os.kill(os.getpid(), self.number)


class KillAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--signal-at-step", type=int, default=0, help="send SIGTERM to itself after this step")
    parser.add_argument("--signal-rank", type=int, default=0, help="the process that receives it")
    parser.add_argument("--signal-at-epoch-end", type=int, default=0,
                        help="send SIGTERM to itself after this epoch's evaluation, before its checkpoints")
    parser.add_argument("--save-rank-weights", action="store_true")
    parser.add_argument("--kill-before-last-of-epoch", type=int, default=0,
                        help="SIGKILL after best.pth and before last.pth of this epoch are written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = tiny_config(args.output_dir)
    config.checkpoint.every_steps = 2
    callbacks = [*default_callbacks(config), KillAtStep(args.kill_at_step),
                 SignalAtStep(args.signal_at_step, args.signal_rank, signal.SIGTERM),
                 SignalWhileEvaluating(args.signal_at_epoch_end, args.signal_rank, signal.SIGTERM)]
    trainer = Trainer(config, callbacks=callbacks)
    if args.kill_before_last_of_epoch:
        save = trainer.save

        def save_then_die(name="last.pth"):
            if name == "last.pth" and trainer.state.epoch == args.kill_before_last_of_epoch and trainer.state.batch == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return save(name)

        trainer.save = save_then_die
    if args.resume:
        trainer.resume(Path(args.output_dir) / "last.pth")
    try:
        trainer.fit(progress=False)
    except TrainingInterrupted as stop:
        print(f"rank {trainer.runtime.rank}: {stop}", file=sys.stderr)
        distributed.teardown()
        sys.exit(PREEMPTED_EXIT_CODE)
    if args.save_rank_weights:
        torch.save(trainer.model.state_dict(), Path(args.output_dir) / f"rank{trainer.runtime.rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main()
