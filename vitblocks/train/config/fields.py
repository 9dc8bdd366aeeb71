"""Config fields that carry their own rules: choices, ranges, and how a field is walked.

A schema field says what it allows where it is declared (`choice`, `bounded`,
`at_least_one`); `check_field_rules` enforces every such rule of a config, naming the
dotted path, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from vitblocks.train.errors import ConfigError


def choice(default: Any, choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]]) -> Any:
    """A field whose value is one of `choices`.

    Args:
        default: The default value.
        choices: The allowed values, or a function giving them when a config is checked
            (for registries that grow, such as attention backends).

    Returns:
        A dataclass field.
    """
    return dataclasses.field(default=default, metadata={"choices": choices})


def bounded(default: Any, allowed: Callable[[Any], bool], says: str) -> Any:
    """A number field with a range (None, where the type allows it, means "off" and is not checked).

    Args:
        default: The default value.
        allowed: Whether a value is in range.
        says: What is allowed, after the value in the message, e.g. "must be > 0".

    Returns:
        A dataclass field.
    """
    return dataclasses.field(default=default, metadata={"range": (allowed, says)})


def at_least_one(default: int) -> Any:
    """A count field that must be >= 1.

    Args:
        default: The default value.

    Returns:
        A dataclass field.
    """
    return bounded(default, lambda v: v >= 1, "must be >= 1")


def iter_fields(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Walk the leaf fields of a config.

    Args:
        obj: A config dataclass.
        prefix: Path prefix of `obj`'s fields.

    Yields:
        (dotted path, value) for every field that is not itself a config.
    """
    for path, value, _ in leaf_fields(obj, prefix):
        yield path, value


def leaf_fields(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """Walk the leaf fields of a config with their declarations.

    Args:
        obj: A config dataclass.
        prefix: Path prefix of `obj`'s fields.

    Yields:
        (dotted path, value, dataclass field: its `metadata` holds the declared rule).
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f


def check_field_rules(config: Any) -> None:
    """Enforce what each field of a config declares: finite numbers, its choices and its range.

    Args:
        config: A config dataclass.

    Raises:
        ConfigError: Naming the field, its value and what is allowed.
    """
    for path, value, f in leaf_fields(config, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}={value!r} is not a finite number")
        if "choices" in f.metadata:
            choices = f.metadata["choices"]
            choices = choices() if callable(choices) else choices
            if value not in choices:
                raise ConfigError(f"{path}={value!r} is not one of {choices}")
        if "range" in f.metadata and value is not None:
            allowed, says = f.metadata["range"]
            try:
                inside = bool(allowed(value))
            except (TypeError, ValueError):  # a value of another shape (a number for a pair, say)
                inside = False
            if not inside:
                raise ConfigError(f"{path}={value!r} {says}")


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.6, prefix: str = "", otherwise: str = "") -> str:
    """A "; did you mean ...?" hint naming the closest choices, for error messages.

    Args:
        name: What was given.
        choices: What could have been meant.
        cutoff: Similarity below which a choice is not suggested.
        prefix: Put before each suggestion (e.g. a section path).
        otherwise: The hint when nothing is close.

    Returns:
        The hint, or `otherwise`. A choice that abbreviates the name by its words' initials
        (`lr` for `learning_rate`), or that the name abbreviates, comes first.

    Examples:
        >>> did_you_mean("learning_rate", ["clip_grad", "weight_decay", "lr"], cutoff=0.3)
        '; did you mean lr or clip_grad?'
    """
    choices = list(choices)
    abbreviations = [c for c in choices if _abbreviates(c, name) or _abbreviates(name, c)]
    close = abbreviations + [c for c in difflib.get_close_matches(name, choices, n=3, cutoff=cutoff)
                             if c not in abbreviations]
    close = close[:2] if abbreviations else close
    return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else otherwise


def _abbreviates(short: str, long: str) -> bool:
    """Whether `short` is `long` with its last dotted name cut to its words' initials (optim.lr)."""
    short_section, _, short_name = short.rpartition(".")
    long_section, _, long_name = long.rpartition(".")
    words = [w for w in long_name.split("_") if w]
    return short_section == long_section and len(words) > 1 and short_name == "".join(w[0] for w in words)


def field_hint(cls: type, name: str) -> Any:
    """The type annotation of one field of a config class.

    Args:
        cls: The config class.
        name: The field.

    Returns:
        The resolved annotation.
    """
    return typing.get_type_hints(cls)[name]
