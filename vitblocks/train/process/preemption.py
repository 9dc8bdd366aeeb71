"""Stopping on a signal, or when a loader worker dies: write a resumable checkpoint, exit.

Clusters stop jobs with signals, to the whole job: SLURM and Kubernetes send SIGTERM to
every process of it (SLURM's `--signal=USR1@120` sends SIGUSR1 ahead of the time limit),
a closed terminal sends SIGHUP, and Ctrl-C sends SIGINT, all to the process group, loader
workers included. So:

- **Loader workers ignore the stop signals** (`ignore_stop_signals`, their
  `worker_init_fn`) and leave stopping to the training process.
- **While `Trainer.fit` runs**, each stop signal asks the run to stop after the optimizer
  step in progress; the trainer then writes `last.pth` at that step and raises
  `TrainingInterrupted`, and the command line exits with `PREEMPTED_EXIT_CODE`. A second
  Ctrl-C stops at once (KeyboardInterrupt), without that checkpoint. A signal that
  arrives before the first step stops the run there, with nothing new trained.
- **During start-up** (building the model and data, reading the checkpoint) the command
  line stops at once on a stop signal (`StopRequested`), with the same exit code.
- **A loader worker that dies** (the out-of-memory killer's SIGKILL, a crash) is named
  with its pid, its signal and the likely cause, and the run stops the same way: a
  checkpoint at the last finished step, then `TrainingInterrupted`. PyTorch's own
  handler would raise its error at whatever line the training process was running (a
  half-written checkpoint, an optimizer step); while training, the trainer's
  `StopSignals` takes that handler's place and only records the death.
"""

from __future__ import annotations

import re
import signal
import threading
from types import FrameType
from typing import Any

from vitblocks.train.errors import DataError, LoaderWorkerDied, StopRequested
from vitblocks.train.process.distributed import Runtime, any_rank

__all__ = ["PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "StopSignals",
           "describe_worker_death", "ignore_stop_signals", "loader_failure",
           "raise_loader_failure", "worker_death"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
"""The signals that stop a run after its current step."""

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run stopped by a signal after writing its checkpoint (sysexits' EX_TEMPFAIL:
try again later), distinct from success (0), bad input (2) and a crash (1)."""


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A loader worker's `worker_init_fn`: ignore the stop signals sent to the whole job.

    The training process decides when to stop (after the step in progress, with a
    checkpoint), and it stops its workers itself.

    Args:
        worker_id: The worker's index (unused; `DataLoader` passes it).
    """
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


_SIGNAL_NAMES = {signal.strsignal(number): number.name for number in signal.Signals if signal.strsignal(number)}

_LIKELY_CAUSE = {
    "SIGKILL": "most likely the out-of-memory killer: lower data.workers or data.batch_size, or give the job more "
               "memory",
    "SIGBUS": "most likely shared memory (/dev/shm) too small for the batches in flight: raise it (a container's "
              "--shm-size) or lower data.workers",
    "SIGSEGV": "a crash in an image decoder or another library: data.workers=0 shows it in the main process",
    "SIGABRT": "a crash in an image decoder or another library: data.workers=0 shows it in the main process",
}
_STOP_CAUSE = ("a stop signal sent to the worker alone (workers ignore those sent to the whole job; send it to the "
               "training process)")


def describe_worker_death(text: str) -> str:
    """Which loader worker died, how, and the likely cause, from PyTorch's message about it.

    Args:
        text: PyTorch's error, e.g. "DataLoader worker (pid 1234) is killed by signal: Killed."

    Returns:
        E.g. "loader worker pid 1234 was killed by SIGKILL (most likely the out-of-memory killer: ...)".

    Examples:
        >>> describe_worker_death("DataLoader worker (pid 7) is killed by signal: Bus error. ")[:47]
        'loader worker pid 7 was killed by SIGBUS (most '
    """
    pids = re.search(r"pid\(?s?\)? ([\d, ]+)", text)
    who = f"loader worker pid {pids.group(1).strip().rstrip(',')}" if pids else "a loader worker"
    killed = re.search(r"killed by signal: ([^.]+)", text)
    if killed:
        name = _SIGNAL_NAMES.get(killed.group(1).strip(), killed.group(1).strip())
        likely = _STOP_CAUSE if name in {n.name for n in STOP_SIGNALS} else _LIKELY_CAUSE.get(name, "")
        return f"{who} was killed by {name}" + (f" ({likely})" if likely else "")
    code = re.search(r"exit code (-?\d+)", text)
    if code:
        return (f"{who} exited with code {code.group(1)} "
                "(its error was lost: data.workers=0 shows it in the main process)")
    return f"{who} exited unexpectedly (data.workers=0 shows any error it raised in the main process)"


def worker_death(error: BaseException, recorded: str | None = None) -> LoaderWorkerDied | None:
    """A loader error that reports a dead worker, as `LoaderWorkerDied` (None for any other error).

    Args:
        error: What iterating a loader raised.
        recorded: The death `StopSignals` recorded from the signal, if any (more precise:
            it knows the worker's signal).

    Returns:
        The death, or None.
    """
    text = str(error)
    if isinstance(error, LoaderWorkerDied):
        return error
    if not isinstance(error, RuntimeError) or not text.startswith("DataLoader worker"):
        return None
    return LoaderWorkerDied(recorded or describe_worker_death(text))


def loader_failure(error: BaseException, recorded: str | None = None) -> DataError | LoaderWorkerDied | None:
    """Why a loader stopped giving batches, when it is a failure of its data or of a worker.

    Args:
        error: What iterating the loader raised.
        recorded: The death `StopSignals` recorded, if any (`worker_death`).

    Returns:
        The dataset's `DataError` (too many unreadable images, a label out of range), a
        worker's death, or None for any other error (raise it as it is).
    """
    return error if isinstance(error, DataError) else worker_death(error, recorded)


def raise_loader_failure(failure: Exception | None, runtime: Runtime | None = None) -> None:
    """Raise a loader's failure on every process alike: a data error if any process had one, else a
    worker's death if any process had one (the others raise a stand-in naming where to look).

    Args:
        failure: This process's `DataError` or `LoaderWorkerDied`, or None.
        runtime: The process group (None: this process alone).

    Raises:
        DataError: If any process had a data error.
        LoaderWorkerDied: Else, if any process lost a loader worker.
    """
    data_error, died = isinstance(failure, DataError), isinstance(failure, LoaderWorkerDied)
    if runtime is not None:  # both votes on every process, in this order
        data_error, died = any_rank(data_error, runtime), any_rank(died, runtime)
    if data_error:
        raise failure if isinstance(failure, DataError) else DataError("the loader of another process stopped on "
                                                                       "its data; see its message")
    if died:
        raise failure if isinstance(failure, LoaderWorkerDied) else LoaderWorkerDied("a loader worker of another "
                                                                                     "process died")


def _worker_failure_check() -> Any:
    """PyTorch's check of its loader workers (raises RuntimeError naming a dead one), or None if this
    version has none. It reads each worker's state without reaping it."""
    try:
        from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails
    except ImportError:
        return None
    return _error_if_any_worker_fails


class StopSignals:
    """While entered, stop signals are recorded (or, with `at_once`, raise `StopRequested`).

    Recording also covers loader workers: while entered, a worker's death is recorded as
    `worker_failure` instead of PyTorch raising it wherever the process is (call
    `guard_children` after a loader starts its workers, which installs PyTorch's
    handler). Handlers can only be installed from the main thread; elsewhere (a
    notebook's worker thread, say) signals keep their usual effect.

    Args:
        at_once: Raise `StopRequested` on a stop signal instead of recording it (start-up,
            where there is no step to finish); settable while entered.

    Examples:
        >>> with StopSignals() as stop:
        ...     stop.received is None
        True
    """

    def __init__(self, at_once: bool = False) -> None:
        self.at_once = at_once
        self.received: str | None = None
        self.worker_failure: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.received = self.worker_failure = None
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
                outer = getattr(self._previous[number], "__self__", None)
                if isinstance(outer, StopSignals) and outer.received:  # a stop recorded just before: not lost
                    self.received = self.received or outer.received
            if not self.at_once:
                self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._child_exited)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def cause(self) -> str | None:
        """What asks the run to stop.

        Returns:
            The signal received, else a worker's death, else None.
        """
        return self.received or self.worker_failure

    def guard_children(self) -> None:
        """Take the SIGCHLD handler back from PyTorch's loader, which installs its own (raising) when
        it starts its first workers. On exit the handler from before entering is put back, not
        PyTorch's: its error would otherwise come at the next worker's exit, wherever the process is."""
        if signal.SIGCHLD not in self._previous or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGCHLD) != self._child_exited:
            signal.signal(signal.SIGCHLD, self._child_exited)

    def _record(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.at_once:
            raise StopRequested(name)
        if number == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
        self.received = self.received or name

    def _child_exited(self, number: int, frame: FrameType | None) -> None:
        check = _worker_failure_check()
        if check is None or self.worker_failure is not None:
            return
        try:
            check()
        except RuntimeError as error:
            self.worker_failure = describe_worker_death(str(error))
