"""Creating timm models at a chosen input size."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn


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
    if img_size is None:
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return timm.create_model(name, **kwargs)
