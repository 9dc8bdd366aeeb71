"""Relaxation: what differs between the loops of a relaxed shared block, checked once."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from timm.layers import LayerScale
from torch import nn

from vitblocks.layers.per_loop import LoopLayerNorm, LoopLayerScale, LoopLoRALinear

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")
"""Linears relaxed by default: attention input/output and MLP projections (timm's names)."""


@dataclass(frozen=True)
class Relaxation:
    """The per-loop corrections of a relaxed block (`RelaxedBlock`), with their one set of defaults.

    Built from keyword arguments or a dict of them (`Relaxation.parse`); the values are
    normalised and checked when it is made, and `check` / `replacements` hold it against
    a block. Relaxing changes nothing the block computes until the corrections train.

    Attributes:
        rank: LoRA rank of every targeted linear, or "full" for min(in, out) of each
            (with which a converted model reproduces its base exactly); 0: none.
        targets: Names of the linears to relax (the last part of their module path,
            e.g. "qkv" matches `attn.qkv`); a single name is taken as a one-name tuple.
        norms: Per-loop LayerNorm offsets (MiniViT-style unshared norms).
        biases: Per-loop bias offsets of the targeted linears.
        layer_scale: Per-loop offsets of timm `LayerScale` gammas.

    Raises:
        ValueError: If `rank` is not an int >= 0 or "full", `targets` is empty, or a
            flag is not a bool.

    Examples:
        >>> Relaxation.parse({"rank": 8, "targets": "qkv"})
        Relaxation(rank=8, targets=('qkv',), norms=False, biases=False, layer_scale=False)
    """

    rank: int | str = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    norms: bool = False
    biases: bool = False
    layer_scale: bool = False

    def __post_init__(self) -> None:
        rank = self.rank
        if rank != "full" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be an int >= 0 or 'full', got {rank!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"targets must be linear names such as {DEFAULT_TARGETS}, got {self.targets!r}")
        object.__setattr__(self, "targets", targets)
        for flag in ("norms", "biases", "layer_scale"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    @classmethod
    def parse(cls, value: Relaxation | Mapping[str, Any] | None = None, /, **options: Any) -> Relaxation:
        """A relaxation from another, a dict of options, or keyword options (not two of them).

        Args:
            value: A `Relaxation`, a dict of its fields, or None.
            **options: Its fields, instead of `value`.

        Returns:
            The relaxation.

        Raises:
            ValueError: For an unknown option (naming the closest one) or a bad value.
            TypeError: If both `value` and options are given, or `value` is of another type.
        """
        if value is not None and options:
            raise TypeError(f"give a relaxation or its options, not both (got {value!r} and {options})")
        if isinstance(value, Relaxation):
            return value
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"a relaxation is a Relaxation or a dict of its options, got {type(value).__name__}")
        options = dict(value or options)
        names = relaxation_options()
        unknown = sorted(set(options) - set(names))
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"relax: unknown option(s) {unknown}{hint}; the options are {names}")
        return cls(**options)

    @property
    def relaxes(self) -> bool:
        """Whether anything differs between loops (else a `RelaxedBlock` computes its block)."""
        return bool(self.rank) or self.norms or self.biases or self.layer_scale

    def as_dict(self) -> dict[str, Any]:
        """The fields, e.g. to record in a config.

        Returns:
            `{"rank": ..., "targets": ..., ...}`.
        """
        return dataclasses.asdict(self)

    def check(self, block: nn.Module) -> None:
        """Check the relaxation against a block without changing it.

        Args:
            block: A block of the kind that will be relaxed.

        Raises:
            ValueError: As `replacements`.
        """
        self.replacements(block)

    def replacements(self, block: nn.Module) -> list[tuple[str, Callable[[int], nn.Module]]]:
        """The modules the relaxation replaces, each with a factory of its per-loop version (given loops).

        Everything is checked before anything is replaced, so a refused relaxation
        leaves the block as it was.

        Args:
            block: The block to relax.

        Returns:
            (module path, factory) pairs.

        Raises:
            ValueError: If a rank is above a targeted linear's full rank, or an option
                finds nothing to relax.
        """
        modules = list(block.named_modules())
        replacements: list[tuple[str, Callable[[int], nn.Module]]] = []
        if self.rank or self.biases:
            replacements += self._linear_replacements(block, modules)
        if self.norms:
            found = [(n, m) for n, m in modules if isinstance(m, nn.LayerNorm) and not isinstance(m, LoopLayerNorm)]
            if not found:
                raise ValueError(f"norms=True: {type(block).__name__} has no nn.LayerNorm")
            replacements += [(name, partial(LoopLayerNorm, norm)) for name, norm in found]
        if self.layer_scale:
            found = [(name, m) for name, m in modules if isinstance(m, LayerScale)]
            if not found:
                raise ValueError(f"layer_scale=True: {type(block).__name__} has no timm LayerScale")
            replacements += [(name, partial(LoopLayerScale, scale)) for name, scale in found]
        return replacements

    def _linear_replacements(self, block: nn.Module,
                             modules: list[tuple[str, nn.Module]]) -> list[tuple[str, Callable[[int], nn.Module]]]:
        linears = [(name, m) for name, m in modules if isinstance(m, nn.Linear)
                   and not isinstance(m, LoopLoRALinear) and name.split(".")[-1] in self.targets]
        if not linears:
            found = sorted({name.split(".")[-1] for name, m in modules if isinstance(m, nn.Linear)})
            raise ValueError(f"no linear of {type(block).__name__} is named one of {self.targets}; "
                             f"its linears are {found}")
        replacements = []
        for name, linear in linears:
            full = min(linear.in_features, linear.out_features)
            rank = full if self.rank == "full" else self.rank
            if rank > full:
                raise ValueError(f"rank {self.rank} is above the full rank of {name} ({linear.out_features}x"
                                 f"{linear.in_features}: at most {full}); use a rank <= {full} or 'full'")
            replacements.append((name, partial(_lora_of, linear, rank, self.biases)))
        return replacements


def _lora_of(linear: nn.Linear, rank: int, biases: bool, loops: int) -> LoopLoRALinear:
    return LoopLoRALinear(linear, loops, rank, bias_offsets=biases)


def relaxation_options() -> tuple[str, ...]:
    """The names of a relaxation's options (the fields of `Relaxation`).

    Returns:
        `("rank", "targets", "norms", "biases", "layer_scale")`.
    """
    return tuple(f.name for f in dataclasses.fields(Relaxation))
