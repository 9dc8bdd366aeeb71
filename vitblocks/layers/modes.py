"""The named choices of the layers, each defined once.

Each is a `str` enum: its members compare equal to their plain-string values, so
`mix="shared"` and `mix=MixMode.SHARED` are the same argument, and the trainer's config
derives its allowed values from these classes.
"""

from __future__ import annotations

import enum
from typing import Literal


class _Choice(str, enum.Enum):
    """A `str` enum (Python 3.10 has no `enum.StrEnum`): members are their string values."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def parse(cls, value: str, argument: str) -> _Choice:
        """The member named by `value`.

        Args:
            value: A member or its string value.
            argument: The argument's name, for the error.

        Returns:
            The member.

        Raises:
            ValueError: Naming the argument, the value and the choices.
        """
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{argument}={value!r} is not one of {tuple(m.value for m in cls)}") from None


class MixMode(_Choice):
    """What follows each application of a shared block (see `Recursive`'s `mix`)."""

    PER_LOOP = "per_loop"
    """One unshared NonLinearMix per loop (the paper)."""
    SHARED = "shared"
    """One NonLinearMix reused by every loop."""
    NONE = "none"
    """No mixing."""


class PermutationPolicy(_Choice):
    """How tokens are shuffled between groups on later loops (see `vitblocks.layers.permutation`)."""

    RANDOM = "random"
    """A fresh permutation per call, drawn on the input's device."""
    RANDOM_CPU = "random_cpu"
    """A fresh permutation per call drawn on the CPU generator: the official code's stream."""
    FIXED = "fixed"
    """A permutation that depends only on the token count and a seed."""
    NONE = "none"
    """No permutation: contiguous raster-order groups."""

    @classmethod
    def parse(cls, value: str, argument: str) -> PermutationPolicy:
        """Like `_Choice.parse`, and "official" names `RANDOM_CPU` (the official code's eval-time draw)."""
        return cls.RANDOM_CPU if value == "official" else super().parse(value, argument)


class CheckpointMode(_Choice):
    """Activation checkpointing of a recursion (see `Recursive`'s `grad_checkpointing`)."""

    LOOP = "loop"
    """Recompute each loop in the backward pass."""
    SQRT = "sqrt"
    """Also checkpoint about sqrt(loops) segments of loops (nested)."""


CheckpointSetting = bool | CheckpointMode | Literal["loop", "sqrt"]
"""What `grad_checkpointing` arguments take: False (off), True (= "loop"), "loop" or "sqrt"."""

CHECKPOINT_SETTINGS: tuple[bool | str, ...] = (False, True, *(m.value for m in CheckpointMode))
"""Every accepted `grad_checkpointing` value."""


def parse_checkpointing(setting: CheckpointSetting, argument: str = "grad_checkpointing") -> CheckpointMode | None:
    """Normalize a `grad_checkpointing` setting.

    Args:
        setting: False, True, "loop" or "sqrt".
        argument: The argument's name, for the error.

    Returns:
        None (off) or the mode.

    Raises:
        ValueError: For anything else.

    Examples:
        >>> parse_checkpointing(True), parse_checkpointing("sqrt"), parse_checkpointing(False)
        (<CheckpointMode.LOOP: 'loop'>, <CheckpointMode.SQRT: 'sqrt'>, None)
    """
    if isinstance(setting, bool):
        return CheckpointMode.LOOP if setting else None
    if isinstance(setting, str) and setting in CheckpointMode._value2member_map_:
        return CheckpointMode(setting)
    raise ValueError(f"{argument}={setting!r} is not one of {CHECKPOINT_SETTINGS}")
