"""The trainer's messages, through Python's `logging` (logger "vitblocks.train").

A run's header, its per-epoch metrics line and its summary are INFO records.
`console_logging` (called by the `Trainer`) sends them to standard output as plain
lines: from the main process only, or from every process with `all_ranks=True` (then
prefixed with the rank). Handlers you add to the "vitblocks.train" logger receive the
records as well; the records do not propagate to the root logger, so an application's
root configuration does not print them twice.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

logger = logging.getLogger("vitblocks.train")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time of each record (so redirection and
    output capture see the lines)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # noqa: ANN201 - the stream logging's handler writes to
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - set by StreamHandler.__init__; stdout is read per record
        pass


def console_logging(rank: int = 0, world_size: int = 1, all_ranks: bool = False) -> None:
    """Show the trainer's INFO records on standard output, unless logging is configured.

    Args:
        rank: This process's rank.
        world_size: Number of processes.
        all_ranks: Show records of every process, not only rank 0's.
    """
    show = rank == 0 or all_ranks
    logger.setLevel(logging.INFO if show else logging.WARNING)
    logger.propagate = False  # the console line is the record's one output
    for handler in [h for h in logger.handlers if isinstance(h, _StdoutHandler)]:
        logger.removeHandler(handler)
    handler = _StdoutHandler()
    prefix = f"[rank {rank}] " if all_ranks and world_size > 1 else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(handler)


def listed(names: list[str], limit: int = 6) -> str:
    """Names for a message: the first `limit`, then "..." when there are more.

    Args:
        names: What to name.
        limit: How many at most.

    Returns:
        E.g. "c1, c2, c10, ...".

    Examples:
        >>> listed(["a", "b", "c"], 2), listed(["a"])
        ('a, b, ...', 'a')
    """
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


@contextlib.contextmanager
def quieted(name: str) -> Iterator[None]:
    """Let a library's logger say only errors for a while (notes it logs that say nothing about our use).

    Args:
        name: The logger, e.g. "torch.utils.cpp_extension".

    Yields:
        Nothing; the level is restored on exit.
    """
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
