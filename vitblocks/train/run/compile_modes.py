"""The trainer's compile modes, and the combinations it refuses before they crash."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitblocks.layers import SlicedGroupAttention
from vitblocks.layers.modes import PermutationPolicy

CUDA_DEFAULT = "none"
"""What `model.compile="auto"` means on CUDA. Eager until a GPU run has timed the modes against
each other (the GPU check's compiled stages): no measurement says yet that another one is faster."""


def compile_mode(value: Any, device: torch.device) -> str:
    """The mode a `model.compile` value names (False / True are "none" / "model"; "auto" depends on the device).

    Args:
        value: The config value.
        device: Where the run trains.

    Returns:
        One of `COMPILE_MODES`.
    """
    if value is False:
        return "none"
    if value is True:
        return "model"
    if value == "auto":
        return CUDA_DEFAULT if device.type == "cuda" else "none"
    return value


def describe_compile(value: Any, device: torch.device) -> str:
    """The compile mode a run uses and why, for its header.

    Args:
        value: The config's `model.compile`.
        device: Where the run trains.

    Returns:
        E.g. "compile=none (model.compile='auto' on cuda: eager until a GPU run has timed the modes)".

    Examples:
        >>> describe_compile(True, torch.device("cpu"))
        'compile=model (model.compile=True)'
    """
    mode = compile_mode(value, device)
    if value != "auto":
        return f"compile={mode} (model.compile={value!r})"
    if device.type == "cuda":
        why = "eager until a GPU run has timed the modes" if mode == "none" else "the measured default on CUDA"
    else:
        why = "eager off CUDA, where compiling takes about a minute before the first step"
    return f"compile={mode} (model.compile='auto' on {device.type}: {why})"


def graphs_refusals(model: nn.Module, device: torch.device, grad_checkpointing: Any) -> list[str]:
    """Why `model.compile="graphs"` cannot run this model here; empty when it can.

    Args:
        model: The model to train.
        device: Where it trains.
        grad_checkpointing: The config's activation checkpointing setting.

    Returns:
        One sentence per problem, each saying what to do instead.
    """
    reasons = []
    if device.type != "cuda":
        reasons.append(f"CUDA graphs need a CUDA device and this run is on {device.type}; "
                       "use model.compile='model' there")
    if any(isinstance(m, SlicedGroupAttention) and PermutationPolicy.RANDOM_CPU in (m.permutation, m.eval_permutation)
           for m in model.modules()):
        reasons.append("permutation='random_cpu' draws each permutation on the CPU and copies it to the GPU, which "
                       "a replayed graph does not repeat (every replay would reuse one permutation); use "
                       "permutation='random', drawn on the GPU")
    if grad_checkpointing:
        reasons.append("activation checkpointing under CUDA graphs fails in torch: random permutations in "
                       "recomputed regions (pytorch/pytorch#130123) and non-reentrant checkpointing of compiled "
                       "regions (pytorch/pytorch#154306); set model.grad_checkpointing=False, or use "
                       "model.compile='model' with checkpointing")
    return reasons
