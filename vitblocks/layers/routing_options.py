"""What a `routing=` setting may say, and the per-loop capacities it gives.

Shared by `TokenRouting` and the models that build it (`SReT(routing=...)`,
`make_recursive(routing=...)`), so a setting is refused the same way, with the same
message, before any layer is built.
"""

from __future__ import annotations

from collections.abc import Sequence

from vitblocks.layers.loop import check_loop_count
from vitblocks.layers.option_dict import check_option_dict

__all__ = ["DEFAULT_BALANCE", "DEFAULT_CAPACITY", "ROUTING_MODES", "ROUTING_OPTIONS", "check_routed_groups",
           "check_routing_options", "routing_capacities"]

DEFAULT_CAPACITY = 0.5
"""The share of tokens a routed loop updates under expert-choice when no capacity is given."""

DEFAULT_BALANCE = 0.01
"""Weight of token-choice's balancing loss when none is given."""

ROUTING_MODES = ("expert", "token")
"""Expert-choice (each loop's router picks its tokens) and token-choice (each token picks its depth once)."""

ROUTING_OPTIONS = ("capacity", "mode", "balance")
"""What a model's `routing=` dict takes (the model pins its own prefix tokens)."""


def check_routing_options(routing: dict | None) -> None:
    """Refuse a model's `routing=` setting that is not a dict of `ROUTING_OPTIONS`.

    Args:
        routing: E.g. `{"capacity": 0.5}` or `{"mode": "token"}`, or None for no routing.

    Raises:
        ValueError: Naming what is wrong and the options there are.

    Examples:
        >>> check_routing_options({"mode": "token", "balance": 0.01})
    """
    check_option_dict(routing, "routing", "token-routing options", "{'capacity': 0.5}", ROUTING_OPTIONS)
    if routing is None:
        return
    check_mode(routing.get("mode", "expert"))
    check_balance(routing.get("balance", DEFAULT_BALANCE))


def check_mode(mode: str) -> str:
    """Refuse a routing mode that is not one of `ROUTING_MODES`.

    Args:
        mode: "expert" or "token".

    Returns:
        `mode`.

    Raises:
        ValueError: Naming the modes there are.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"routing mode must be one of {', '.join(map(repr, ROUTING_MODES))} (expert-choice: each "
                         f"loop picks its tokens; token-choice: each token picks its depth), got {mode!r}")
    return mode


def check_balance(balance: float) -> float:
    """Refuse a balancing-loss weight that is not a number >= 0.

    Args:
        balance: The weight.

    Returns:
        `balance` as a float.

    Raises:
        ValueError: Naming the value.
    """
    if isinstance(balance, bool) or not isinstance(balance, (int, float)) or not balance >= 0:
        raise ValueError(f"routing balance must be a number >= 0 (the balancing loss's weight), got {balance!r}")
    return float(balance)


def routing_capacities(capacity: float | Sequence[float] | str | None, loops: int,
                       mode: str = "expert") -> tuple[float, ...]:
    """The capacity of each loop: a sequence as given, or one number for every loop after the first.

    Args:
        capacity: The share of tokens each loop updates (expert-choice) or gathers
            (token-choice), in (0, 1]; one number for every loop but the first (which
            updates all tokens), a sequence gives one per loop. "descending":
            (loops - n) / loops at loop n (Mixture-of-Recursions' schedule, and the share of
            tokens that reach loop n when depths are spread evenly). None: expert-choice's
            `DEFAULT_CAPACITY`, token-choice's "descending".
        loops: Applications of the block.
        mode: "expert" or "token".

    Returns:
        One capacity per loop.

    Raises:
        ValueError: For a capacity outside (0, 1], or a sequence whose length is not `loops`.

    Examples:
        >>> routing_capacities(0.5, 3)
        (1.0, 0.5, 0.5)
        >>> routing_capacities((1.0, 0.5, 0.25), 3)
        (1.0, 0.5, 0.25)
        >>> routing_capacities("descending", 4)
        (1.0, 0.75, 0.5, 0.25)
    """
    check_loop_count(loops)
    if capacity is None:
        capacity = "descending" if check_mode(mode) == "token" else DEFAULT_CAPACITY
    if capacity == "descending":
        return tuple((loops - n) / loops for n in range(loops))
    if isinstance(capacity, str):
        raise ValueError(f"capacity must be a number in (0, 1], one per loop, or 'descending', got {capacity!r}")
    if isinstance(capacity, (int, float)) and not isinstance(capacity, bool):
        values = (1.0, *(float(capacity),) * (loops - 1))
    else:
        values = tuple(float(c) for c in capacity)
        if len(values) != loops:
            raise ValueError(f"capacity={tuple(capacity)!r} gives {len(values)} loops' capacities for loops={loops}: "
                             "give one per loop, or one number for every loop after the first")
    bad = [c for c in values if not 0.0 < c <= 1.0]
    if bad:
        raise ValueError(f"capacity must be in (0, 1] (the share of tokens a loop updates), got {bad[0]!r}")
    if mode == "token" and values[0] < 1.0:
        raise ValueError(f"capacity={tuple(values)!r}: under token-choice every token takes the first loop, so its "
                         "capacity must be 1.0; give the later loops' capacities after it")
    return values


def check_routed_groups(capacities: Sequence[float], schedule: object, where: str) -> None:
    """Refuse a group schedule that slices a routed loop's tokens into more than one group.

    Groups follow the tokens' places in the image, which gathered tokens no longer have.

    Args:
        capacities: Each loop's capacity (`routing_capacities`).
        schedule: A `GroupSchedule` (anything with `at(loop)`).
        where: What holds the schedule, for the message.

    Raises:
        ValueError: Naming the loop and the schedule that fits.

    Examples:
        >>> from vitblocks.layers import GroupSchedule
        >>> check_routed_groups((1.0, 0.5), GroupSchedule.parse((4, 1)), "the block")
    """
    for loop, capacity in enumerate(capacities):
        if capacity < 1.0 and schedule.at(loop) > 1:
            fitting = tuple(schedule.at(n) if c >= 1.0 else 1 for n, c in enumerate(capacities))
            raise ValueError(
                f"loop {loop} is routed (capacity {capacity}) but {where} slices its tokens into {schedule.at(loop)} "
                "groups there: groups follow the tokens' places in the image, which routed tokens no longer have. "
                f"Use 1 group on routed loops (groups={fitting}), or capacity 1.0 on sliced loops")
