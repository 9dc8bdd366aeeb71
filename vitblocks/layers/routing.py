"""Token routing: at each loop, a router picks the tokens a shared block updates (expert-choice).

Weight-shared recursion spends the same depth on every token. `TokenRouting` wraps a
block so that each application of its weights updates only the `capacity` share of the
tokens its router scores highest, as in Mixture-of-Recursions' expert-choice routing
(Bae et al., NeurIPS 2025) and the token-level recursion of MoR-ViT:

- **Static shapes.** k = ceil(capacity * tokens) is fixed by the capacity, so every batch
  has the same shapes and `torch.compile(fullgraph=True)`, CUDA graphs and `torch.export`
  hold. Images are not causal, so the top k over the whole image is allowed at inference.
- **Skipped tokens cost nothing.** The chosen tokens are gathered (in their original
  order), run through the block, and scattered back; the others pass through unchanged.
- **Attention among routed tokens** is the chosen queries over the chosen keys: the block
  sees only the gathered sequence. Sliced group attention groups tokens by their place in
  the image, which a gathered sequence no longer has, so a routed loop whose group count
  is above 1 is refused at construction.
- **The router learns** through its weight: a chosen token's update is scaled by
  sigmoid(score), `x + sigmoid(s) * (block(x) - x)`, so the loss reaches the router.
  Scores are computed in float32 (also under autocast); routers start with small random
  weights (no ties) and a zero bias (updates scaled by about 1/2), and only routed loops
  have one.
- **Prefix tokens** (class, distillation) can be pinned: they are always updated, at
  full weight, and do not count against the capacity.
- **Mix layers.** The stack hands its mix layer (SReT's `NonLinearMix` after each loop)
  to the routing, which applies it to the updated tokens only: a token that skips a loop
  skips that loop's mix as well, and passes through unchanged.

Each loop chooses afresh among all tokens (MoR filters hierarchically: only tokens chosen
at the previous step can be chosen again). A loop at capacity 1.0 runs the block on every
token, unweighted: with every capacity at 1.0 the wrapped block is exactly the static one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitblocks.layers.loop import check_loop_count, is_loop_aware
from vitblocks.layers.scripting import NotScriptable

__all__ = ["DEFAULT_CAPACITY", "ROUTING_OPTIONS", "TokenRouting", "check_routed_groups", "check_routing_options",
           "routing_capacities"]

DEFAULT_CAPACITY = 0.5
"""The share of tokens a routed loop updates when no capacity is given."""

ROUTING_OPTIONS = ("capacity",)
"""What a model's `routing=` dict takes (the model pins its own prefix tokens)."""


def check_routing_options(routing: dict | None) -> None:
    """Refuse a model's `routing=` setting that is not a dict of `ROUTING_OPTIONS`.

    Args:
        routing: E.g. `{"capacity": 0.5}`, or None for no routing.

    Raises:
        ValueError: Naming what is wrong and the options there are.

    Example:
        >>> check_routing_options({"capacity": 0.5})
    """
    if routing is None:
        return
    if not isinstance(routing, dict):
        raise ValueError(f"routing must be a dict of token-routing options, e.g. {{'capacity': 0.5}}, got {routing!r}")
    unknown = sorted(set(routing) - set(ROUTING_OPTIONS))
    if unknown:
        raise ValueError(f"routing: unknown option(s) {', '.join(unknown)} (options: {', '.join(ROUTING_OPTIONS)})")


def check_routed_groups(capacities: Sequence[float], schedule: object, where: str) -> None:
    """Refuse a group schedule that slices a routed loop's tokens into more than one group.

    Groups follow the tokens' places in the image, which gathered tokens no longer have.

    Args:
        capacities: Each loop's capacity (`routing_capacities`).
        schedule: A `GroupSchedule` (anything with `at(loop)`).
        where: What holds the schedule, for the message.

    Raises:
        ValueError: Naming the loop and the schedule that fits.

    Example:
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


def routing_capacities(capacity: float | Sequence[float], loops: int) -> tuple[float, ...]:
    """The capacity of each loop: a sequence as given, or one number for every loop after the first.

    Args:
        capacity: The share of tokens each loop updates, in (0, 1]; one number routes every
            loop but the first (which updates all tokens), a sequence gives one per loop.
        loops: Applications of the block.

    Returns:
        One capacity per loop.

    Raises:
        ValueError: For a capacity outside (0, 1], or a sequence whose length is not `loops`.

    Example:
        >>> routing_capacities(0.5, 3)
        (1.0, 0.5, 0.5)
        >>> routing_capacities((1.0, 0.5, 0.25), 3)
        (1.0, 0.5, 0.25)
    """
    check_loop_count(loops)
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
    return values


class TokenRouting(NotScriptable, nn.Module):
    """A block whose loops each update only the tokens a router chooses (expert-choice routing).

    Put it where the block goes: `Recursive(TokenRouting(block, dim, loops=4, capacity=0.5), loops=4)`.

    Args:
        block: The shared block, called as `block(x, loop=n)` if loop-aware, else `block(x)`,
            on (B, P + k, C) gathered tokens.
        dim: Token width (the router's input).
        loops: Applications of the block: one router per loop.
        capacity: The share of (non-pinned) tokens each loop updates (`routing_capacities`):
            one number routes every loop after the first; a sequence gives one per loop.
        pinned: Prefix tokens (class, distillation) that every loop updates.
        device: Where the routers' parameters live.
        dtype: Dtype of the routers' parameters.

    Raises:
        ValueError: For a bad capacity or `pinned`, or a routed loop whose attention slices
            tokens into groups.

    Example:
        >>> from vitblocks.layers import Recursive, TransformerBlock
        >>> routed = TokenRouting(TransformerBlock(dim=32, num_heads=2), dim=32, loops=3, capacity=0.5, pinned=1)
        >>> Recursive(routed, loops=3)(torch.randn(2, 17, 32)).shape
        torch.Size([2, 17, 32])
    """

    loop_aware = True
    applies_mix = True  # the stack's mix layer follows the update of the chosen tokens only

    def __init__(self, block: nn.Module, dim: int, loops: int, capacity: float | Sequence[float] = DEFAULT_CAPACITY,
                 pinned: int = 0, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(pinned, bool) or not isinstance(pinned, int) or pinned < 0:
            raise ValueError(f"pinned must be an int >= 0 (prefix tokens every loop updates), got {pinned!r}")
        self.block, self.pinned = block, pinned
        self.capacities = routing_capacities(capacity, loops)
        # a router only for the loops that route (keys are the loop indices): an unused one would get no
        # gradient, which DDP without a static graph refuses
        self.routers = nn.ModuleDict({str(loop): nn.Linear(dim, 1, device=device, dtype=dtype)
                                      for loop, c in enumerate(self.capacities) if c < 1.0})
        for router in self.routers.values():  # small random scores: no ties for topk to break by position
            nn.init.normal_(router.weight, std=0.02)
            nn.init.zeros_(router.bias)
        self._block_aware = is_loop_aware(block)
        self._block_draws = callable(getattr(block, "draw_drop_masks", None))
        self._refuse_sliced_routed_loops()

    def _refuse_sliced_routed_loops(self) -> None:
        for name, module in self.block.named_modules():
            schedule = getattr(module, "schedule", None)
            if schedule is not None and callable(getattr(schedule, "at", None)):
                check_routed_groups(self.capacities, schedule, name or "the block")

    def _trained_loop(self, loop: int) -> int:
        """The loop whose router and capacity serve `loop`: itself, or the last one beyond the trained loops."""
        return min(loop, len(self.capacities) - 1)

    def tokens_updated(self, num_tokens: int, loop: int) -> int:
        """How many tokens a loop updates (pinned ones included).

        Args:
            num_tokens: Tokens in the sequence, prefix included.
            loop: The loop.

        Returns:
            P + ceil(capacity * (N - P)), or every token at capacity 1.0.
        """
        capacity = self.capacities[self._trained_loop(loop)]
        routed = num_tokens - self.pinned
        return num_tokens if capacity >= 1.0 else self.pinned + max(1, math.ceil(capacity * routed))

    def draw_drop_masks(self, x: torch.Tensor, loops: int) -> torch.Tensor | None:
        """The wrapped block's stochastic-depth factors for `loops` applications, drawn at once
        (see `TransformerBlock.draw_drop_masks`): the gathered tokens keep the batch dimension.

        Args:
            x: The stack's input.
            loops: Applications to draw for.

        Returns:
            The block's factors, or None if it draws none.
        """
        return self.block.draw_drop_masks(x, loops) if self._block_draws else None

    def _call_block(self, x: torch.Tensor, loop: int, drop_masks: torch.Tensor | None) -> torch.Tensor:
        extra = {} if drop_masks is None else {"drop_masks": drop_masks}
        return self.block(x, loop=loop, **extra) if self._block_aware else self.block(x, **extra)

    def forward(self, x: torch.Tensor, loop: int = 0, mix: nn.Module | None = None,
                drop_masks: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block once, to the tokens this loop's router chooses.

        Loops beyond those it has routers for (test-time depth, `set_loops`) reuse the last
        loop's router and capacity; the block itself is told the loop as it is.

        Args:
            x: Tokens of shape (B, N, C), the first `pinned` of them prefix tokens.
            loop: Index of this application.
            mix: The mix layer that follows this application in the stack (`NonLinearMix`),
                applied to the updated tokens only: a token that skips the loop skips its
                mix too.
            drop_masks: This application's stochastic-depth factors (`draw_drop_masks`),
                handed to the block.

        Returns:
            Tensor of shape (B, N, C): chosen tokens updated, the others as they came.

        Raises:
            ValueError: For a negative loop, or no token beyond the pinned ones.
        """
        if loop < 0:
            raise ValueError(f"loop must be >= 0, got {loop}")
        trained = self._trained_loop(loop)
        if self.capacities[trained] >= 1.0:
            out = self._call_block(x, loop, drop_masks)
            return out if mix is None else mix(out)
        batch, num_tokens, width = x.shape
        if num_tokens <= self.pinned:
            raise ValueError(f"TokenRouting got {num_tokens} tokens with pinned={self.pinned}: nothing to route")
        k = self.tokens_updated(num_tokens, loop) - self.pinned
        router = self.routers[str(trained)]
        precise = torch.promote_types(x.dtype, torch.float32)  # scores in float32 at least: no ties from bf16
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x[:, self.pinned:].to(precise), router.weight.to(precise),
                              router.bias.to(precise)).squeeze(-1)
        chosen = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # in token order
        weight = torch.sigmoid(scores.gather(1, chosen)).to(x.dtype)
        index = chosen + self.pinned
        if self.pinned:
            prefix = torch.arange(self.pinned, device=x.device).expand(batch, -1)
            index = torch.cat([prefix, index], dim=1)
            weight = torch.cat([weight.new_ones(batch, self.pinned), weight], dim=1)
        index = index.unsqueeze(-1).expand(-1, -1, width)
        tokens = x.gather(1, index)
        updated = tokens + weight.unsqueeze(-1) * (self._call_block(tokens, loop, drop_masks) - tokens)
        if mix is not None:
            updated = mix(updated)
        return x.scatter(1, index, updated.to(x.dtype))
