"""Reading and writing checkpoint files safely.

Every reader here uses `torch.load(..., weights_only=True)`: a file that holds anything
but tensors and plain containers is refused rather than executed. The writer replaces a
file atomically, so a crash leaves the old file or the new one, never a partial one.

This module depends on nothing else in vitblocks; the trainer, the evaluator and the
official-checkpoint converter all read files through it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `obj` with torch.save to a temporary file, then rename it over `path`.

    A crash at any moment leaves either the previous file or the new one, never a
    partial file.

    Args:
        obj: What to save.
        path: Destination.
    """
    with replacing(path) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file beside `path` to write; on success it is synced and renamed over
    `path`, on any error (KeyboardInterrupt too) removed.

    Args:
        path: The file to replace.

    Yields:
        The temporary file's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model_file(model: torch.nn.Module, path: str | os.PathLike, name: str | None = None,
                    metadata: dict[str, str] | None = None) -> None:
    """Write a module's weights as safetensors to `path` (write it through `replacing` to make it atomic).

    Args:
        model: The module (`safetensors.torch.save_model`: shared tensors are stored once).
        path: Destination.
        name: The file's name for messages (default: the path's).
        metadata: Text stored in the file's header (`safetensors.safe_open(...).metadata()`).

    Raises:
        OSError: If the file cannot be written (a full disk, no permission).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    try:
        save_model(model, os.fspath(path), metadata=metadata)
    except SafetensorError as error:  # how safetensors reports a failed write (ENOSPC among others)
        raise OSError(f"safetensors could not write {name or Path(path).name}: {error}") from error


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity.

    One host synchronization for the whole dict, whatever its size.

    Args:
        tensors: A state dict (non-float entries are ignored).

    Returns:
        The names, in the dict's order; empty when every value is finite.

    Examples:
        >>> non_finite_tensors({"w": torch.ones(2), "b": torch.tensor([float("nan")]), "n": torch.tensor([3])})
        ['b']
    """
    names = [name for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not names:
        return []
    device = tensors[names[0]].device
    finite = torch.stack([torch.isfinite(tensors[name]).all().to(device) for name in names])
    return [name for name, ok in zip(names, finite.tolist()) if not ok]


def load_weights_only(path: str | os.PathLike, hint: str = "", mmap: bool = False) -> Any:
    """`torch.load` that only accepts tensors and plain containers, with clear errors.

    Args:
        path: The file.
        hint: Advice appended to the error for a file that cannot be read.
        mmap: Map the file instead of reading it whole (`torch.load(mmap=True)`).

    Returns:
        Whatever the file holds.

    Raises:
        FileNotFoundError: If there is no such file.
        CheckpointError: If the file is truncated, corrupt, or holds other Python objects.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{os.fspath(path)!r} is empty (0 bytes): it was never written completely.{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several types for damaged or unsafe files
        reason = " ".join(str(error).split()) or "no message"
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", reason)
        if refused:
            raise CheckpointError(
                f"{os.fspath(path)!r} is readable but holds a Python object ({refused.group(1)}), refused for safety "
                f"by weights-only loading: it was not written by vitblocks' trainer, whose checkpoints hold tensors "
                f"and plain values only.{hint}"
            ) from error
        raise CheckpointError(
            f"could not read {os.fspath(path)!r} as a weights-only PyTorch checkpoint. The file may be truncated "
            f"or corrupt, or contain Python objects other than tensors, which are refused for safety.{hint} "
            f"torch said ({type(error).__name__}): {reason}"
        ) from error


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the state dict in a checkpoint file without unpickling arbitrary objects.

    Accepts a `.safetensors` file, or a PyTorch file holding a bare state dict or a dict
    holding one under `model` or `state_dict`.

    Args:
        path: The file.

    Returns:
        The state dict.

    Raises:
        FileNotFoundError: If there is no such file.
        CheckpointError: If the file is corrupt, truncated, holds non-tensor objects, or
            holds no state dict.
    """
    if os.fspath(path).endswith(".safetensors") and os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(os.fspath(path))
        except SafetensorError as error:
            raise CheckpointError(f"could not read {os.fspath(path)!r} as a safetensors file ({error}); "
                                  "it may be truncated or corrupt") from error
    checkpoint = load_weights_only(path)
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise CheckpointError(f"{os.fspath(path)!r} holds no state dict "
                              "(expected tensors, under 'model' or at top level)")
    return checkpoint
