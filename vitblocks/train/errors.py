"""The trainer's errors, in one module every part imports: each says what was wrong and what to do.

`CheckpointError` (from `vitblocks.io`) is the base of the errors about a run's files.
"""

from __future__ import annotations

from pathlib import Path

from vitblocks.io import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "DataError", "FolderError", "LoaderWorkerDied", "RunExistsError",
           "RunLinkError", "RunLockedError", "RunWriteError", "StopRequested", "StoppedElsewhere", "TrainingDiverged",
           "TrainingInterrupted"]


class ConfigError(ValueError):
    """A recipe or override that cannot be applied."""


class DataError(FileNotFoundError):
    """A dataset folder that is missing or has no images.

    Args:
        message: What is wrong.
        advice: What to do, for the trainer's command line (eval gives its own).
    """

    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(f"{message}\n{advice}" if advice else message)
        self.problem, self.advice = message, advice


class FolderError(OSError):
    """A folder of the tree that cannot be listed."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):  # noqa: N818 - an event, like KeyboardInterrupt
    """A stop signal arrived, or a loader worker died; the run wrote a resumable checkpoint and stopped.

    Args:
        signal_name: What stopped it: a signal's name ("SIGTERM") or a sentence (a worker's death).
        checkpoint: The checkpoint to resume from (None: none exists).
        step: Optimizer steps done.
        epoch: The epoch in progress (1-based).
        batch: Batches of it done.
        trained: Whether this session trained any step (False: stopped before the first
            one, and `checkpoint` is the one it resumed from, unchanged).
    """

    def __init__(self, signal_name: str, checkpoint: Path | None, step: int, epoch: int, batch: int,
                 trained: bool = True) -> None:
        self.signal_name, self.checkpoint = signal_name, checkpoint
        self.step, self.epoch, self.batch, self.trained = step, epoch, batch, trained
        by = f"by {signal_name}" if signal_name.startswith("SIG") else f"because {signal_name}"
        if trained:
            saved = f"saved {checkpoint}" if checkpoint else "nothing saved"
            text = f"stopped {by} at step {step} (epoch {epoch}, batch {batch}); {saved}"
        else:
            kept = f"{checkpoint} is unchanged" if checkpoint else "no checkpoint was written"
            text = f"stopped {by} before the first step: nothing new was trained; {kept}"
        super().__init__(text)


class StopRequested(BaseException):  # noqa: N818 - like KeyboardInterrupt, which `except Exception` lets pass
    """A stop signal during start-up, raised at once wherever the process was.

    Args:
        signal_name: The signal, e.g. "SIGTERM".
    """

    def __init__(self, signal_name: str) -> None:
        self.signal_name = signal_name
        super().__init__(f"stopped by {signal_name} during start-up, before the first step: nothing new was trained")


class LoaderWorkerDied(RuntimeError):
    """A loader's worker process died: the batches it held will never come.

    Args:
        cause: Which worker, how it died and the likely cause (`describe_worker_death`).
    """

    def __init__(self, cause: str) -> None:
        self.cause = cause
        super().__init__(cause)


class StoppedElsewhere(RuntimeError):
    """Another process failed; this one stops with it (the other process's message says why)."""


class RunExistsError(CheckpointError):
    """The output folder already holds files a run writes, and neither resuming nor overwriting was asked for."""


class RunLinkError(CheckpointError):
    """A name of the run is a symbolic link: writing it would write outside the run's folder."""


class RunWriteError(CheckpointError):
    """A file of the run could not be written (a full disk, no permission); the previous file is intact."""


class RunLockedError(CheckpointError):
    """Another live run holds the output folder."""
