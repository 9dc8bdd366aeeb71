"""Stopping on a signal: finish the current step, write a resumable checkpoint, exit.

Clusters stop jobs with signals: SLURM and Kubernetes send SIGTERM (SLURM's
`--signal=USR1@120` sends SIGUSR1 ahead of the time limit), and Ctrl-C sends SIGINT.
While `Trainer.fit` runs, each of the three asks the run to stop after the optimizer step
in progress; the trainer then writes `last.pth` at that step and raises
`TrainingInterrupted`, and the command line exits with `PREEMPTED_EXIT_CODE`. A second
Ctrl-C stops at once (KeyboardInterrupt), without that checkpoint.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "StopSignals", "TrainingInterrupted"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""The signals that stop a run after its current step."""

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run stopped by a signal after writing its checkpoint (sysexits' EX_TEMPFAIL:
try again later), distinct from success (0), bad input (2) and a crash (1)."""


class TrainingInterrupted(Exception):  # noqa: N818 - an event, like KeyboardInterrupt
    """A stop signal arrived; the run wrote a resumable checkpoint and stopped.

    Args:
        signal_name: The signal, e.g. "SIGTERM".
        checkpoint: The checkpoint to resume from.
        step: Optimizer steps done.
        epoch: The epoch in progress (1-based).
        batch: Batches of it done.
    """

    def __init__(self, signal_name: str, checkpoint: Path | None, step: int, epoch: int, batch: int) -> None:
        self.signal_name, self.checkpoint = signal_name, checkpoint
        self.step, self.epoch, self.batch = step, epoch, batch
        saved = f"saved {checkpoint}" if checkpoint else "nothing saved"
        super().__init__(f"stopped by {signal_name} at step {step} (epoch {epoch}, batch {batch}); {saved}")


class StopSignals:
    """While entered, record the stop signals instead of dying on them.

    Handlers can only be installed from the main thread; elsewhere (a notebook's worker
    thread, say) signals keep their usual effect.

    Example:
        >>> with StopSignals() as stop:
        ...     stop.received is None
        True
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _record(self, number: int, frame: FrameType | None) -> None:
        if number == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
        self.received = signal.Signals(number).name
