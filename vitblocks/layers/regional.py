"""Regional compilation: compile each shared block once instead of the unrolled model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitblocks.layers.shared_stack import SharedStack

VARIANTS_PER_REGION = 8
"""Compiled variants allowed per recursive block (train / eval, group counts, shapes)."""


def compile_regions(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile every `Recursive` block (and `SharedSequence`) of a model once (regional compilation).

    `torch.compile(model)` traces the whole forward pass, unrolling each `Recursive`
    loop, so compile time grows with the number of loops (1000 block applications are
    1000 traced blocks). Regional compilation compiles one application of each shared
    block instead (see `SharedStack.compile_block`): compile time depends on how many
    distinct blocks there are, not on how often they run. The rest of the model (stem,
    pooling, head) stays eager.

    Every region shares one compiled function, and `torch.compile` allows only
    `torch._dynamo.config.recompile_limit` variants of one function; this raises that
    limit to at least `VARIANTS_PER_REGION` per recursive block.

    Args:
        model: Any module containing `Recursive` blocks; compiled in place.
        **compile_kwargs: Passed to `torch.compile` (e.g. `mode="max-autotune"`);
            `dynamic` defaults to False (a static graph per stage shape).

    Returns:
        `model`, for chaining.

    Raises:
        ValueError: If the model has no `Recursive` block (use `torch.compile(model)`).

    Examples:
        >>> import timm, torch, vitblocks
        >>> model = compile_regions(timm.create_model("sret_t", img_size=64, loops=10, mix="shared"))
        >>> sum(block.compiled for block in model.modules() if isinstance(block, SharedStack))
        10
    """
    regions = [module for module in model.modules() if isinstance(module, SharedStack)]
    if not regions:
        raise ValueError(
            f"{type(model).__name__} has no Recursive block to compile; use torch.compile(model) instead"
        )
    compile_kwargs.setdefault("dynamic", False)  # one static graph per stage shape: no shape guards to widen
    for region in regions:
        region.compile_block(**compile_kwargs)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, VARIANTS_PER_REGION * len(regions))
    return model
