"""Runs the trainer's command line in this process with a fault during one optimizer step.

    python tests/fault_driver.py STEP wait RECIPE [TRAINER ARGS ...]
    python tests/fault_driver.py STEP kill-worker RECIPE [TRAINER ARGS ...]

During step STEP (after its forward pass), `wait` prints "waiting for a signal" and waits
until a stop signal has arrived: the test then signals the whole process group from
outside, loader workers included, as SLURM or a closed terminal does (start this in a
session of its own). `kill-worker` sends SIGKILL to one loader worker, as the
out-of-memory killer does, and prints its pid. Either way the step then goes on a moment
later, once the fault has reached this process.
"""

import multiprocessing
import os
import signal
import sys
import time

import vitblocks.train.run.engine as engine
from vitblocks.train import Callback
from vitblocks.train.__main__ import main


class FaultInStep(Callback):
    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_loss(self, trainer, loss):
        if trainer.state.step != self.step - 1:
            return
        if self.action == "kill-worker":
            worker = multiprocessing.active_children()[0].pid  # this process's only children: its loader workers
            print(f"killing worker {worker}", flush=True)
            os.kill(worker, signal.SIGKILL)
        else:
            print("waiting for a signal", flush=True)
        deadline = time.monotonic() + 60
        while trainer.stop_requested() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # whatever else the fault does reaches this process now


if __name__ == "__main__":
    step, action, *argv = sys.argv[1:]
    defaults = engine.default_callbacks
    engine.default_callbacks = lambda config: [*defaults(config), FaultInStep(int(step), action)]
    sys.exit(main(argv))
