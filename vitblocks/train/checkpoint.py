"""Atomic, weights-only training checkpoints and exact resumption."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitblocks.models.official import CheckpointError, load_weights_only


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write `obj` with torch.save to a temporary file, then rename it over `path`.

    A crash at any moment leaves either the previous file or the new one, never a
    partial file.

    Args:
        obj: What to save.
        path: Destination.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    """Capture every random generator the training loop draws from.

    Returns:
        Plain data and tensors (safe to load with `weights_only=True`).
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by `rng_state`.

    Args:
        state: Output of `rng_state`.
    """
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a trainer checkpoint safely (no arbitrary unpickling).

    Args:
        path: The checkpoint.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If it is corrupt, truncated, or not a trainer checkpoint.
    """
    checkpoint = load_weights_only(path, hint=" Resume from another checkpoint (last.pth / best.pth) or start afresh.")
    required = {"model", "optimizer", "scheduler", "epoch", "batch", "step", "config", "rng"}
    if not isinstance(checkpoint, dict) or not required <= checkpoint.keys():
        missing = sorted(required - (checkpoint.keys() if isinstance(checkpoint, dict) else set()))
        raise CheckpointError(f"{str(path)!r} is not a vitblocks training checkpoint (missing {missing})")
    return checkpoint
