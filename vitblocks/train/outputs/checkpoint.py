"""Training checkpoints read back safely, and the random streams they hold for exact resumption.

Checkpoints are written by `vitblocks.train.outputs.run_folder.RunFolder` (atomically); what a
resumed run must keep the same is checked by `vitblocks.train.outputs.resume_checks`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitblocks.io import CheckpointError, load_weights_only

__all__ = ["CheckpointError", "load_training_checkpoint", "rng_state", "set_rng_state"]


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


def load_training_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a trainer checkpoint safely (no arbitrary unpickling).

    Args:
        path: The checkpoint.
        mmap: Map the file instead of reading it whole (tensors are read when used).

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If it is corrupt, truncated, or not a trainer checkpoint.
    """
    checkpoint = load_weights_only(path, hint=" Resume from another checkpoint (last.pth / best.pth) or start afresh.",
                                   mmap=mmap)
    required = {"model", "optimizer", "scheduler", "epoch", "batch", "step", "config", "rng"}
    if not isinstance(checkpoint, dict) or not required <= checkpoint.keys():
        missing = sorted(required - (checkpoint.keys() if isinstance(checkpoint, dict) else set()))
        raise CheckpointError(f"{str(path)!r} is not a vitblocks training checkpoint (missing {missing})")
    return checkpoint
