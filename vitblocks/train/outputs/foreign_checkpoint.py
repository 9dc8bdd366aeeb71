"""Weights written by other trainers: timm's train.py checkpoints and bare state dicts.

timm's `train.py` saves `model_best.pth.tar` / `last.pth.tar` as a dict with `state_dict`,
`state_dict_ema` (with `--model-ema`), `optimizer`, `epoch` and its command line as an
`argparse.Namespace` under `args`. `read_foreign_checkpoint` reads such a file with
`weights_only=True`, allowing that one class (`torch.serialization.safe_globals`), never
arbitrary unpickling; a bare state dict, a `.safetensors` file or a dict holding one
under `model` are read too.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from vitblocks.io import CheckpointError, load_weights_only, read_checkpoint

EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
WEIGHT_KEYS = ("state_dict", "model")


@dataclass
class ForeignCheckpoint:
    """The weights of a checkpoint from another trainer, and what it says about its run.

    Attributes:
        weights: The state dict (a DDP `module.` prefix removed).
        args: The writer's settings (timm's `args` Namespace as a dict); empty if none.
        source: Which entry the weights came from ("state_dict_ema", "state_dict", ...,
            or "the file" for a bare state dict).
    """

    weights: dict[str, torch.Tensor]
    args: dict[str, Any] = field(default_factory=dict)
    source: str = "the file"


def read_foreign_checkpoint(path: str | os.PathLike, ema: bool = False) -> ForeignCheckpoint:
    """Read a timm train.py checkpoint, a bare state dict or a `.safetensors` file safely.

    Args:
        path: The file.
        ema: Take the EMA weights (`state_dict_ema`, `model_ema` or `ema`).

    Returns:
        The weights and the writer's args.

    Raises:
        FileNotFoundError: If there is no such file.
        CheckpointError: If the file cannot be read, holds other Python objects, holds no
            weights, or holds no EMA weights when `ema` is asked for.
    """
    if os.fspath(path).endswith(".safetensors"):
        if ema:
            raise CheckpointError(f"{os.fspath(path)!r} is a .safetensors file of one set of weights; it holds no EMA "
                                  "weights (drop --ema)")
        return ForeignCheckpoint(read_checkpoint(path))
    with torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py stores its args as one
        checkpoint = load_weights_only(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{os.fspath(path)!r} holds a {type(checkpoint).__name__}, not a state dict or a "
                              "checkpoint dict")
    args = checkpoint.get("args")
    settings = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}
    keys = EMA_KEYS if ema else WEIGHT_KEYS
    source = next((key for key in keys if isinstance(checkpoint.get(key), dict)), None)
    if source is None and ema:
        raise CheckpointError(f"{os.fspath(path)!r} holds no EMA weights (none of {', '.join(EMA_KEYS)}); its "
                              f"entries are {', '.join(map(str, list(checkpoint)[:10]))}. Drop --ema.")
    weights = checkpoint[source] if source else checkpoint
    if not weights or not all(torch.is_tensor(value) for value in weights.values()):
        raise CheckpointError(f"{os.fspath(path)!r} holds no state dict: expected tensors at its top level or "
                              f"under {' / '.join(WEIGHT_KEYS)}; its entries are "
                              f"{', '.join(map(str, list(checkpoint)[:10]))}")
    from timm.models import clean_state_dict

    return ForeignCheckpoint(clean_state_dict(weights), settings, source or "the file")
