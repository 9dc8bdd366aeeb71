"""Test-time depth: run a trained recursive model with more (or fewer) loops."""

from __future__ import annotations

from torch import nn

from vitblocks.layers.shared_stack import SharedStack


def set_loops(model: nn.Module, loops: int) -> int:
    """Set the loop count of every shared block of a model (test-time depth).

    Models that keep their own record of loop counts (SReT) define `set_loops`, which is
    called instead; other models have their layers set by `set_layer_loops`.

    Each `Recursive` applies its block `loops` times and each cycle-scheduled
    `SharedSequence` runs `loops` cycles. What exists once per trained loop — per-loop
    mix layers, group counts, relaxation deltas — is reused from the last trained loop
    for later loops; with fewer loops the first ones run. Nothing is re-initialised, so
    setting the trained count back restores the model exactly.

    Args:
        model: Any module holding `Recursive` / `SharedSequence` layers.
        loops: Loops per shared block, >= 1.

    Returns:
        The number of layers changed.

    Raises:
        ValueError: If `loops` is invalid, the model has no shared block, or a
            `SharedSequence` is not cycle-scheduled.

    Examples:
        >>> import timm, torch, vitblocks
        >>> from vitblocks.layers import set_loops
        >>> model = timm.create_model("sret_t", img_size=64).eval()
        >>> set_loops(model, 3)
        10
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    own = getattr(model, "set_loops", None)
    if callable(own) and not isinstance(model, SharedStack):
        own(loops)
        return sum(isinstance(m, SharedStack) for m in model.modules())
    return set_layer_loops(model, loops)


def set_layer_loops(model: nn.Module, loops: int) -> int:
    """Set `loops` on every `Recursive` and `SharedSequence` of a model (see `set_loops`).

    Args:
        model: Any module.
        loops: Loops per shared block, >= 1.

    Returns:
        The number of layers changed.

    Raises:
        ValueError: As `set_loops`.
    """
    layers = [m for m in model.modules() if isinstance(m, SharedStack)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Recursive or SharedSequence layer; test-time depth "
                         "applies to weight-shared models")
    for layer in layers:
        layer.set_loops(loops)
    return len(layers)
