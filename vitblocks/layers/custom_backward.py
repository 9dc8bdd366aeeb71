"""When a layer's hand-written backward pass applies."""

from __future__ import annotations

import torch


def custom_backward_applies(*inputs: torch.Tensor) -> bool:
    """Whether to run a custom `torch.autograd.Function` instead of the plain operators it replaces.

    Only in eager training: some input needs a gradient, and no tracer or compiler is
    recording (their graphs then hold standard operators, and compilers fuse those anyway).

    Args:
        *inputs: The tensors the function would differentiate.

    Returns:
        True where the custom backward should run.
    """
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())
