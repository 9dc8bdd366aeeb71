"""One training run per output folder: a lock held for the run's life.

`RunLock` writes `OUTPUT_DIR/run.lock` with the holder's pid, host, start time and
command, and holds an exclusive `flock` on it. The kernel releases that lock when the
process ends, however it ends (a crash, SIGKILL, a node that reboots), so a lock left
behind by a dead run is stale by construction and the next run takes it over. On
filesystems without `flock` (some network and FUSE mounts) the rule falls back to the
file's contents: a holder on this host is alive while its pid runs; a holder on another
host is alive while it keeps the file fresh (the trainer touches it as it trains), and
stale after `STALE_AFTER_S` seconds without a touch.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vitblocks.io import CheckpointError
from vitblocks.train.errors import RunLockedError

try:
    import fcntl
except ImportError:  # Windows: the contents rule alone
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "STALE_AFTER_S", "RunLock", "RunLockedError"]

LOCK_NAME = "run.lock"
"""The lock file's name inside the output folder."""

STALE_AFTER_S = 30 * 60
"""Without `flock`: a lock from another host not touched for this long is stale."""


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run whose lock file cannot be read"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


class RunLock:
    """The output folder's lock, for the life of a run.

    Args:
        output_dir: The run folder (created if needed).

    Examples:
        >>> import tempfile
        >>> with RunLock(tempfile.mkdtemp()) as lock:
        ...     lock.holder()["pid"] == os.getpid()
        True
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None
        """The holder a stale lock named, when this run took it over."""

    def holder(self) -> dict[str, Any]:
        """The run the lock file names.

        Returns:
            Its pid, host, start time and command (empty if there is none or it cannot be read).
        """
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        """Take the lock, or refuse naming the run that holds it.

        Returns:
            Itself.

        Raises:
            RunLockedError: If a live run holds the folder.
            CheckpointError: If the folder cannot be created or written.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointError(f"cannot create the output folder {self.path.parent}: {error.strerror or error}; "
                                  "choose another --output-dir") from None
        try:
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                previous = self.holder()
                try:
                    locked = self._flock(fd, previous)
                except BaseException:
                    os.close(fd)
                    raise
                if not locked:
                    os.close(fd)
                    raise RunLockedError(
                        f"{self.path.parent} is in use by another training run ({_describe(previous)}). Wait for it "
                        f"to finish, stop it, or choose another --output-dir. (A run that died leaves no live lock: "
                        f"the next run takes {self.path.name} over.)")
                if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self._fd = fd
                else:  # the holder removed the file between our open and our lock: lock the new one
                    os.close(fd)
            self.took_over = previous or None
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "command": " ".join(sys.argv)}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(record).encode(), 0)
        except OSError as error:
            self.release()
            raise CheckpointError(f"cannot lock the output folder {self.path.parent}: {error.strerror or error}; "
                                  "choose another --output-dir") from None
        return self

    def _flock(self, fd: int, previous: dict[str, Any]) -> bool:
        """Whether this process now holds the lock."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        return not holder_alive(previous, self.path)

    def refresh(self) -> None:
        """Mark the lock as fresh (for the contents rule on filesystems without `flock`)."""
        if self._fd is not None:
            try:
                os.utime(self.path)
            except OSError:
                pass  # a lock that cannot be touched is still held

    def release(self) -> None:
        """Give the lock up and remove the file."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_alive(holder: dict[str, Any], path: Path, now: float | None = None) -> bool:
    """The contents rule: whether the run a lock file names may still be running.

    Args:
        holder: The lock file's contents (empty: no holder).
        path: The lock file (its modification time is the holder's last sign of life).
        now: The current time (default: `time.time()`).

    Returns:
        True for a live pid on this host, or a lock from another host touched within
        `STALE_AFTER_S`.
    """
    if not holder:
        return False
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True  # the pid runs as another user, or the file is odd: do not take it
        return True
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    return age < STALE_AFTER_S
