"""Mixed precision: the autocast context of each precision setting, in one place."""

from __future__ import annotations

import contextlib

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The autocast context that runs a model in `precision` on a device type.

    Args:
        precision: "fp32" (no autocast), "bf16" or "fp16".
        device_type: "cuda", "cpu", ...

    Returns:
        A context manager.

    Raises:
        ValueError: For another precision.

    Examples:
        >>> with autocast_for("bf16", "cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r} is not one of ('fp32', 'bf16', 'fp16')")
    return torch.autocast(device_type, dtype=_DTYPES[precision])
