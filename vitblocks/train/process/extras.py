"""The packages only the trainer needs, from vitblocks' `train` extra."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'vitblocks[train]' (from a checkout: pip install -e '.[train]')"


def import_train_extra(module: str, extra: str = "train") -> ModuleType:
    """Import a package of one of vitblocks' extras, saying how to install it when it is missing.

    Args:
        module: The module, e.g. "tqdm" or "sklearn.datasets".
        extra: The extra that brings it ("train", "tracking", ...).

    Returns:
        The module.

    Raises:
        ImportError: Naming the missing package and the install command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        hint = INSTALL_HINT.replace("[train]", f"[{extra}]")
        raise ImportError(f"{module.split('.')[0]} is not installed: it comes with vitblocks' {extra} extra; "
                          f"{hint}") from error
