"""Whether the state about to be checkpointed is still a good one.

A loss is computed before the update it drives, so a finite loss does not vouch for the
weights that update produced. Before writing a checkpoint the trainer asks
`checkpoint_problem`: are the weights (and the EMA's) finite, and do they give finite
logits on the batch just trained on? A checkpoint that fails is not written, so the file
a divergence message names as the last good one is one that really is.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vitblocks.io import non_finite_tensors

__all__ = ["checkpoint_problem"]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


@torch.no_grad()
def checkpoint_problem(model: nn.Module, ema: nn.Module | None = None, inputs: torch.Tensor | None = None,
                       autocast: contextlib.AbstractContextManager | None = None) -> str | None:
    """What makes the current weights unfit for a checkpoint, if anything.

    Args:
        model: The trained model.
        ema: Its EMA copy, if any.
        inputs: A batch to run the weights on (in eval mode, so no statistics or random
            streams change); None checks the weights alone.
        autocast: The run's mixed-precision context, for that forward pass.

    Returns:
        None when the state is good, else what is wrong.
    """
    for name, module in (("weights", model), ("EMA weights", ema)):
        if module is not None:
            broken = non_finite_tensors(module.state_dict())
            if broken:
                return f"the {name} are not finite ({_listed(broken)})"
    if inputs is None or not len(inputs):
        return None
    training = model.training
    model.eval()
    try:
        with autocast or contextlib.nullcontext():
            logits = model(inputs)
    finally:
        model.train(training)
    if not bool(torch.isfinite(logits).all()):
        return "the weights give non-finite logits on the last batch"
    return None
