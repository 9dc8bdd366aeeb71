"""Runs the trainer's command line in this process, pausing in one step for a signal from outside.

    python tests/fault_driver.py STEP RECIPE [TRAINER ARGS ...]

During optimizer step STEP (after its forward pass) it prints "waiting for a signal" and
waits until a stop signal has arrived, then a moment more while the step goes on. The
test then signals the whole process group from outside, loader workers included, as
SLURM or a closed terminal does (start this in a session of its own).
"""

import sys
import time

import vitblocks.train.engine as engine
from vitblocks.train import Callback
from vitblocks.train.__main__ import main


class WaitForSignalInStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_loss(self, trainer, loss):
        if trainer.state.step != self.step - 1:
            return
        print("waiting for a signal", flush=True)
        deadline = time.monotonic() + 60
        while trainer._stop.cause() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # what the signal does to the loader workers reaches this process now


if __name__ == "__main__":
    step, *argv = sys.argv[1:]
    defaults = engine.default_callbacks
    engine.default_callbacks = lambda config: [*defaults(config), WaitForSignalInStep(int(step))]
    sys.exit(main(argv))
