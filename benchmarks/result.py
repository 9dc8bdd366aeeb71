"""One row of a benchmark run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Result:
    """One measured configuration.

    Attributes:
        group: Which comparison the row belongs to ("models", "vs_naive", "backends",
            "attention", "recursion", "reference").
        name: The configuration.
        backend: Attention backend ("-" where none applies).
        mode: "train" (forward, backward and optimizer step) or "infer".
        img_s: Images per second (for "reference" rows, the value their name states).
        iqr_pct: Interquartile range of the timings, in % of the median.
        peak_mib: Peak tensor memory of one step, MiB.
    """

    group: str
    name: str
    backend: str
    mode: str
    img_s: float
    iqr_pct: float
    peak_mib: float
