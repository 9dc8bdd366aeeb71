"""Atomic, weights-only training checkpoints and exact resumption."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitblocks.io import CheckpointError, load_weights_only, save_atomic

__all__ = [
    "CHECKPOINTS",
    "RESUME_KEYS",
    "RUN_FILES",
    "RUN_OUTPUTS",
    "CheckpointError",
    "RunExistsError",
    "clear_run",
    "incompatible_changes",
    "load_training_checkpoint",
    "prepare_output_dir",
    "refuse_existing_run",
    "resume_candidate",
    "rng_state",
    "save_atomic",
    "set_rng_state",
]

RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "model.safetensors")
"""Files whose presence means a folder holds a run."""

RUN_OUTPUTS = (*RUN_FILES, "model_ema.safetensors", "config.json", "curves.png", "best/model.safetensors",
               "best/model_ema.safetensors", "best/config.json")
"""Everything a run writes; `--overwrite` removes all of it, so nothing of the replaced run is left behind."""

CHECKPOINTS = ("last.pth", "best.pth")
"""The checkpoints a run can continue from, newest first."""


class RunExistsError(CheckpointError):
    """The output folder already holds a run, and neither resuming nor overwriting was asked for."""


RESUME_KEYS = (("model", "name"), ("model", "kwargs"), ("data", "num_classes"), ("optim", "opt"))
"""Config fields a checkpoint's model and optimizer state depend on: a resumed run must keep them."""


def incompatible_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields of `RESUME_KEYS` that differ between a checkpoint's config and the current one.

    Args:
        saved: The checkpoint's config (`to_dict` output).
        current: The current config, the same way.

    Returns:
        One "path: checkpoint X, now Y" line per difference.

    Example:
        >>> print(*incompatible_changes({"optim": {"opt": "adamw"}}, {"optim": {"opt": "sgd"}}))
        optim.opt: 'adamw' in the checkpoint, 'sgd' now
    """
    changes = []
    for section, key in RESUME_KEYS:
        before, now = saved.get(section, {}).get(key), current.get(section, {}).get(key)
        if before is not None and before != now:
            changes.append(f"{section}.{key}: {before!r} in the checkpoint, {now!r} now")
    return changes


def refuse_existing_run(output_dir: Path) -> None:
    """Refuse to start a fresh run in a folder that holds one.

    Args:
        output_dir: The run folder.

    Raises:
        RunExistsError: Naming the files found and the three ways on.
    """
    found = [name for name in RUN_FILES if (Path(output_dir) / name).exists()]
    if found:
        ways = "Replace it with --overwrite or choose another --output-dir."
        if resume_candidate(output_dir) is not None:
            ways = "Continue it with --resume auto, replace it with --overwrite, or choose another --output-dir."
        raise RunExistsError(f"{output_dir} already holds a run ({', '.join(found)}); starting afresh would "
                             f"overwrite it. {ways}")


def resume_candidate(output_dir: str | Path) -> Path | None:
    """The checkpoint `--resume auto` continues from: `last.pth`, else `best.pth` (when writing
    `last.pth` failed after `best.pth` was written, say on a full disk).

    Args:
        output_dir: The run folder.

    Returns:
        The path, or None when the folder holds neither.
    """
    for name in CHECKPOINTS:
        if (Path(output_dir) / name).is_file():
            return Path(output_dir) / name
    return None


def clear_run(output_dir: str | Path) -> None:
    """Remove every file a run writes (`RUN_OUTPUTS`), for `--overwrite`.

    Args:
        output_dir: The run folder.
    """
    for name in RUN_OUTPUTS:
        (Path(output_dir) / name).unlink(missing_ok=True)


def prepare_output_dir(output_dir: Path) -> None:
    """Create the run folder and remove temporary files left by a write that was killed.

    Args:
        output_dir: The run folder.

    Raises:
        CheckpointError: If the folder cannot be created (a file in the way, no permission).
    """
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create the output folder {output_dir}: {error.strerror or error}; "
                              "choose another --output-dir") from None
    for pattern in (".*.pth.*.tmp", ".*.safetensors.*.tmp", ".config.json.*.tmp"):
        for stale in Path(output_dir).glob(pattern):
            stale.unlink(missing_ok=True)


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
