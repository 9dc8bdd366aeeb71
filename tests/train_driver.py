"""Runs a tiny training job in its own process, for tests that kill or distribute it.

    python tests/train_driver.py OUTPUT_DIR [--kill-at-step N] [--resume] [--save-rank-weights]
    python tests/train_driver.py OUTPUT_DIR --doubled-batch-check
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import doubled_batch_config, tiny_config  # noqa: E402
from vitblocks.train import Callback, Trainer, default_callbacks  # noqa: E402
from vitblocks.train.errors import TrainingInterrupted  # noqa: E402
from vitblocks.train.process import distributed  # noqa: E402
from vitblocks.train.process.preemption import PREEMPTED_EXIT_CODE  # noqa: E402


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
    parser.add_argument("--doubled-batch-check", action="store_true",
                        help="doubled_batch_config (2 batches per update); "
                             "writes the batches whose backward all-reduced")
    parser.add_argument("--kill-before-last-of-epoch", type=int, default=0,
                        help="SIGKILL after best.pth and before last.pth of this epoch are written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.doubled_batch_check:
        config = doubled_batch_config(args.output_dir, batch_size=8)
    else:
        config = tiny_config(args.output_dir)
        config.checkpoint.every_steps = 2
    callbacks = [*default_callbacks(config), KillAtStep(args.kill_at_step),
                 SignalAtStep(args.signal_at_step, args.signal_rank, signal.SIGTERM),
                 SignalWhileEvaluating(args.signal_at_epoch_end, args.signal_rank, signal.SIGTERM)]
    trainer = Trainer(config, callbacks=callbacks)
    if args.kill_before_last_of_epoch:
        save = trainer.save

        def save_then_die(name="last.pth"):
            if (name == "last.pth" and trainer.state.epoch == args.kill_before_last_of_epoch
                    and trainer.state.batch == 0):
                os.kill(os.getpid(), signal.SIGKILL)
            return save(name)

        trainer.save = save_then_die
    if args.resume:
        trainer.resume(Path(args.output_dir) / "last.pth")
    reduced_at = []
    if args.doubled_batch_check:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_allreduce(group, bucket):
            reduced_at.append(trainer.state.batch)
            return allreduce_hook(group, bucket)

        trainer.train_model.register_comm_hook(None, counting_allreduce)
    try:
        trainer.fit(progress=False)
    except TrainingInterrupted as stop:
        print(f"rank {trainer.runtime.rank}: {stop}", file=sys.stderr)
        distributed.teardown()
        sys.exit(PREEMPTED_EXIT_CODE)
    if args.save_rank_weights or args.doubled_batch_check:
        torch.save(trainer.model.state_dict(), Path(args.output_dir) / f"rank{trainer.runtime.rank}.pt")
    if args.doubled_batch_check:
        (Path(args.output_dir) / f"reduced{trainer.runtime.rank}.json").write_text(json.dumps(reduced_at))
    distributed.teardown()


if __name__ == "__main__":
    main()
