"""Weights of a model without token routing, loaded into the same model with it.

Routing wraps each shared block in `TokenRouting`, which holds the block as `.block` and
adds routers: a static model's `stages.2.blocks.0.block.attn.qkv.weight` is the routed
model's `stages.2.blocks.0.block.block.attn.qkv.weight`. `with_routers` moves such keys
one level down and fills the routers from the model's own (freshly initialised) ones, so
a routed model starts from a trained static one through timm's loading paths.
"""

from __future__ import annotations

import torch
from torch import nn

from vitblocks.layers.routing import TokenRouting

__all__ = ["with_routers"]


def with_routers(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A static model's state dict in the layout of `model`, whose blocks are routed.

    Args:
        state_dict: Weights of the model without routing (or already with it: returned as given).
        model: The routed model to load into.

    Returns:
        The weights, the routed blocks' keys moved under `.block` and the routers taken from
        `model`; unchanged when `model` has no routing or the weights already have routers.
    """
    routed = [name for name, module in model.named_modules() if isinstance(module, TokenRouting)]
    if not routed or any(".routers." in key for key in state_dict):
        return state_dict
    own = model.state_dict()
    moved = dict(state_dict)
    for name in routed:
        prefix = f"{name}."
        for key in [k for k in moved if k.startswith(prefix)]:
            moved[f"{prefix}block.{key[len(prefix):]}"] = moved.pop(key)
        for key, value in own.items():
            if key.startswith(f"{prefix}routers."):
                moved[key] = value
    return moved
