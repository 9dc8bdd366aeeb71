"""The packages only the trainer needs, from vitblocks' `train` extra."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'vitblocks[train]' (from a checkout: pip install -e '.[train]')"


def import_train_extra(module: str) -> ModuleType:
    """Import a package of the `train` extra, saying how to install it when it is missing.

    Args:
        module: The module, e.g. "tqdm" or "sklearn.datasets".

    Returns:
        The module.

    Raises:
        ImportError: Naming the missing package and the install command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module.split('.')[0]} is not installed: the trainer needs vitblocks' train extra; "
                          f"{INSTALL_HINT}") from error
