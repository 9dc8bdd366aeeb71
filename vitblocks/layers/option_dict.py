"""The one check of a model's dict-valued setting (`routing=`, `early_exit=`): a dict of known options."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_option_dict"]


def check_option_dict(setting: object, name: str, what: str, example: str, options: Sequence[str]) -> None:
    """Refuse a setting that is not None or a dict whose keys are among `options`.

    Args:
        setting: The value given.
        name: The argument's name, e.g. "routing".
        what: What its options are, e.g. "token-routing options".
        example: A valid value, as written in Python.
        options: The keys it may have.

    Raises:
        ValueError: Naming what is wrong and the options there are.

    Examples:
        >>> check_option_dict({"threshold": 0.9}, "early_exit", "exit options", "{'threshold': 0.9}", ("threshold",))
    """
    if setting is None:
        return
    if not isinstance(setting, dict):
        raise ValueError(f"{name} must be a dict of {what}, e.g. {example}, got {setting!r}")
    unknown = sorted(set(setting) - set(options))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)} (options: {', '.join(options)})")
