"""Creating timm models at a chosen input size."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import timm
import torch
from torch import nn


@functools.cache
def model_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The parameters of a registered model's class constructor (`self` left out), and
    `routing` for the recursive timm variants (`vitblocks.models.plugged_variants`).

    The model is built once per name on the meta device (no memory, no initialisation),
    or for real when its constructor needs real tensors.

    Args:
        name: A registered timm model name.

    Returns:
        Parameter name -> `inspect.Parameter`.
    """
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - a model whose constructor needs real tensors: build it for real
        model = timm.create_model(name, pretrained=False)
    parameters = dict(inspect.signature(type(model).__init__).parameters)
    parameters.pop("self", None)
    from vitblocks.models.plugged_variants import VARIANTS

    if name in VARIANTS:  # taken by the variant itself, not by the base model's class
        default = VARIANTS[name][1].get("routing")
        parameters["routing"] = inspect.Parameter("routing", inspect.Parameter.KEYWORD_ONLY, default=default)
    return parameters


def takes_img_size(name: str) -> bool:
    """Whether a registered model is built for an input size (its class takes `img_size`).

    Args:
        name: A registered timm model name.

    Returns:
        True for ViTs, SReT and other models built at a fixed size; False for models
        that run at any size and take no such argument (most CNNs).

    Examples:
        >>> takes_img_size("sret_t"), takes_img_size("resnet18")
        (True, False)
    """
    return "img_size" in model_parameters(name)


def create_model_at_size(name: str, img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """`timm.create_model`, passing `img_size` only to models that take it.

    Args:
        name: A registered model name.
        img_size: Input resolution, or None for the model's default.
        **kwargs: Further `timm.create_model` arguments.

    Returns:
        The model; one that takes no `img_size` argument runs at any size and is built
        without it.
    """
    if img_size is not None and takes_img_size(name):
        kwargs["img_size"] = img_size
    return timm.create_model(name, **kwargs)
