"""The models vitblocks registers in timm's model registry."""

from __future__ import annotations

import timm
from timm.models import model_entrypoint


def registered_models(pattern: str = "*") -> list[str]:
    """Names of the models vitblocks registers (SReT and the recursive timm variants).

    Deprecated names (which timm maps to their replacements) are left out. Tests that
    hold every model to timm's contract iterate over this list, so a model registered
    later is covered without being named.

    Args:
        pattern: A `timm.list_models` wildcard filter.

    Returns:
        The names, sorted.

    Examples:
        >>> import vitblocks
        >>> "sret_t" in registered_models() and "deit_tiny_patch16_224" not in registered_models()
        True
    """
    return [name for name in timm.list_models(pattern) if model_entrypoint(name).__module__.startswith("vitblocks.")]
