"""Timing with warm-up and repetitions, and peak memory, on CPU or CUDA."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vitblocks.profiling import PeakMemory


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the repetitions.

    Attributes:
        median: Median seconds.
        iqr: Interquartile range of the seconds.
        repeats: Number of timed calls.
    """

    median: float
    iqr: float
    repeats: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timing(times: list[float]) -> Timing:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), quartiles[2] - quartiles[0], len(times))


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes, device work included.

    Args:
        fn: The work.
        device: Its device (CUDA is synchronized before and after).

    Returns:
        Wall-clock seconds.
    """
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2, repeats: int = 5
) -> dict[str, Timing]:
    """Time several functions in turns (A, B, C, A, B, C, ...), for ratios between them.

    Drift of the machine (clock, other load, allocator state) then hits every function
    alike instead of whichever happened to run during it.

    Args:
        fns: The work to time, by name.
        device: Its device.
        warmup: Untimed calls of each function first.
        repeats: Timed calls of each function.

    Returns:
        Median and interquartile range of the seconds per call, by name.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    return {name: _timing(values) for name, values in times.items()}


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory of tensors created while `fn` runs.

    Args:
        fn: The work to measure.
        device: CUDA uses the allocator's statistics; CPU uses `PeakMemory`.

    Returns:
        Bytes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakMemory() as memory:
        fn()
    return memory.peak
