"""Token routing: at each loop, only some tokens are updated by a shared block.

Weight-shared recursion spends the same depth on every token. `TokenRouting` wraps a
block so that each application of its weights updates only some of the tokens, as in
Mixture-of-Recursions (Bae et al., NeurIPS 2025) and the token-level recursion of MoR-ViT.
Two ways to choose:

- **Expert-choice** (`mode="expert"`, the default): each routed loop has a router that
  scores every token; the loop updates the `capacity` share it scores highest. Images are
  not causal, so the top k over the whole image is allowed at inference.
- **Token-choice** (`mode="token"`): one router, on the stack's input, gives each token a
  depth (how many loops after the first it takes), once per forward pass. Loop n updates
  the tokens whose depth reaches it. A balancing loss (MoR's, after Switch Transformer)
  keeps the depths spread; `auxiliary_loss(model)` collects it for the trainer.

What both share:

- **Static shapes.** Each loop gathers k = ceil(capacity * tokens) tokens, fixed by the
  capacity, so every batch has the same shapes and `torch.compile(fullgraph=True)`, CUDA
  graphs and `torch.export` hold. Under token-choice a loop gathers the tokens whose depth
  reaches it first (by their router probability); if fewer reach it, the slots left are
  filled with the highest-scored others, which serve as keys but are not updated; if more
  reach it, those beyond capacity stop there (as tokens over an expert's capacity are
  dropped in MoE).
- **Skipped tokens cost nothing.** The gathered tokens (in their original order) run
  through the block and are scattered back; the others pass through unchanged.
- **Attention among routed tokens** is the gathered queries over the gathered keys: the
  block sees only the gathered sequence. Sliced group attention groups tokens by their
  place in the image, which a gathered sequence no longer has, so a loop below capacity 1.0
  whose group count is above 1 is refused at construction.
- **The router learns** through its weight: an updated token's update is scaled by the
  router's weight w, `x + w * (block(x) - x)`, so the loss reaches the router: w is
  sigmoid(score) under expert-choice and the probability of the chosen depth under
  token-choice. Scores are computed in float32 (also under autocast); routers start with
  small random weights (no ties) and a zero bias, and only routed loops have one.
- **Prefix tokens** (class, distillation) can be pinned: they are always updated, at
  full weight, and do not count against the capacity.
- **Mix layers.** The stack hands its mix layer (SReT's `NonLinearMix` after each loop)
  to the routing, which applies it to the updated tokens only: a token that skips a loop
  skips that loop's mix as well, and passes through unchanged.

The first loop updates every token, unweighted. Each expert-choice loop chooses afresh
among all tokens (MoR filters hierarchically: only tokens chosen at the previous step can
be chosen again). With every expert-choice capacity at 1.0 the wrapped block is exactly
the static one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitblocks.layers.loop import is_loop_aware
from vitblocks.layers.routing_options import (
    DEFAULT_BALANCE,
    DEFAULT_CAPACITY,
    ROUTING_OPTIONS,
    check_balance,
    check_mode,
    check_routed_groups,
    check_routing_options,
    routing_capacities,
)
from vitblocks.layers.scripting import NotScriptable

__all__ = ["DEFAULT_CAPACITY", "ROUTING_OPTIONS", "DepthChoice", "RoutedDraw", "TokenRouting", "auxiliary_loss",
           "check_routed_groups", "check_routing_options", "routing_capacities"]


def gathered_count(num_tokens: int, pinned: int, capacity: float) -> int:
    """Tokens a routed loop gathers: P + ceil(capacity * (N - P)), at least one routed token.

    Args:
        num_tokens: Tokens in the sequence (N), prefix included.
        pinned: Prefix tokens (P), always gathered.
        capacity: The loop's capacity.

    Returns:
        The count, at most N.

    Raises:
        ValueError: When no token is left beyond the pinned ones.
    """
    if num_tokens <= pinned:
        raise ValueError(f"TokenRouting got {num_tokens} tokens with pinned={pinned}: nothing to route; give it "
                         "more tokens than it pins (or a smaller pinned)")
    return min(num_tokens, pinned + max(1, math.ceil(capacity * (num_tokens - pinned))))


def router_scores(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pinned: int) -> torch.Tensor:
    """A router's scores of the tokens after the first `pinned`, (B, N - P, outputs), in float32 at least
    (bf16 scores would tie) and outside autocast.

    Args:
        x: Tokens (B, N, C).
        weight: The router's weight (outputs, C).
        bias: Its bias (outputs,).
        pinned: Prefix tokens, not scored.

    Returns:
        The scores.
    """
    precise = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x[:, pinned:].to(precise), weight.to(precise), bias.to(precise))


# torch.fx (timm's feature extraction) records each as one call: they branch on shapes and dtypes
torch.fx.wrap("gathered_count")
torch.fx.wrap("router_scores")


@dataclass(frozen=True)
class DepthChoice:
    """One forward pass's token-choice decision, made on the stack's input.

    Attributes:
        depth: (B, N - P) loops after the first that each routed token takes.
        gate: (B, N - P) the router's probability of that depth, which scales the token's updates.
    """

    depth: torch.Tensor
    gate: torch.Tensor


@dataclass(frozen=True)
class RoutedDraw:
    """What one application of a token-choice block is handed from the once-per-forward draw.

    Attributes:
        drop_masks: The wrapped block's stochastic-depth factors for this application, or None.
        choice: The tokens' depths.
    """

    drop_masks: torch.Tensor | None
    choice: DepthChoice

    def rows(self, keep: torch.Tensor) -> RoutedDraw:
        """The draw of some images only (an early exit keeps the rest of the batch).

        Args:
            keep: Indices of the images kept.

        Returns:
            The same draw for those images.
        """
        masks = None if self.drop_masks is None else self.drop_masks[:, keep]
        return RoutedDraw(masks, DepthChoice(self.choice.depth[keep], self.choice.gate[keep]))


class Pending(list):
    """What a layer keeps from its last training pass for the trainer (losses, logits): a list that a
    copy or a pickle of the model leaves empty, since it holds tensors of a finished graph.

    Args:
        iterable: The first items, as for `list`.
    """

    def __init__(self, iterable: Iterable = ()) -> None:
        super().__init__(iterable)

    def __deepcopy__(self, memo: dict) -> Pending:
        return type(self)()

    def __reduce__(self) -> tuple:
        return type(self), ()


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Take the routing losses of the model's last training forward pass (token-choice's balancing loss).

    Each is handed out once: a second call before the next forward pass returns None.

    Args:
        model: Any module (a DDP wrapper too).

    Returns:
        Their sum (already weighted by each layer's `balance`), or None if no layer has one.

    Examples:
        >>> from vitblocks.layers import Recursive, TransformerBlock
        >>> block = TokenRouting(TransformerBlock(dim=8, num_heads=2), dim=8, loops=2, mode="token")
        >>> _ = Recursive(block, loops=2)(torch.randn(2, 5, 8))
        >>> auxiliary_loss(block).shape
        torch.Size([])
    """
    losses = []
    for module in model.modules():
        if isinstance(module, TokenRouting) and module.pending_loss:
            losses += module.pending_loss
            module.pending_loss.clear()
    return torch.stack(losses).sum() if losses else None


class TokenRouting(NotScriptable, nn.Module):
    """A block whose loops each update only some tokens, chosen by a router (expert- or token-choice).

    Put it where the block goes: `Recursive(TokenRouting(block, dim, loops=4, capacity=0.5), loops=4)`.

    Args:
        block: The shared block, called as `block(x, loop=n)` if loop-aware, else `block(x)`,
            on (B, P + k, C) gathered tokens.
        dim: Token width (the router's input).
        loops: Applications of the block: expert-choice has a router per routed loop,
            token-choice one router with a score per depth.
        capacity: The share of (non-pinned) tokens each loop gathers (`routing_capacities`):
            one number for every loop after the first, a sequence one per loop, None the
            mode's default.
        mode: "expert" (each loop picks its tokens) or "token" (each token picks its depth).
        balance: Weight of token-choice's balancing loss (`auxiliary_loss`); 0 turns it off.
        pinned: Prefix tokens (class, distillation) that every loop updates.
        device: Where the routers' parameters live.
        dtype: Dtype of the routers' parameters.

    Raises:
        ValueError: For a bad capacity, mode, balance or `pinned`, or a routed loop whose
            attention slices tokens into groups.

    Examples:
        >>> from vitblocks.layers import Recursive, TransformerBlock
        >>> routed = TokenRouting(TransformerBlock(dim=32, num_heads=2), dim=32, loops=3, capacity=0.5, pinned=1)
        >>> Recursive(routed, loops=3)(torch.randn(2, 17, 32)).shape
        torch.Size([2, 17, 32])
        >>> by_token = TokenRouting(TransformerBlock(dim=32, num_heads=2), dim=32, loops=3, mode="token", pinned=1)
        >>> Recursive(by_token, loops=3)(torch.randn(2, 17, 32)).shape
        torch.Size([2, 17, 32])
    """

    loop_aware = True
    applies_mix = True  # the stack's mix layer follows the update of the chosen tokens only

    def __init__(self, block: nn.Module, dim: int, loops: int, capacity: float | Sequence[float] | None = None,
                 mode: str = "expert", balance: float = DEFAULT_BALANCE, pinned: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(pinned, bool) or not isinstance(pinned, int) or pinned < 0:
            raise ValueError(f"pinned must be an int >= 0 (prefix tokens every loop updates), got {pinned!r}")
        self.block, self.pinned, self.mode = block, pinned, check_mode(mode)
        self.balance = check_balance(balance)
        self.capacities = routing_capacities(capacity, loops, mode)
        self.pending_loss = Pending()  # the balancing loss of the last training pass, until taken
        dd = {"device": device, "dtype": dtype}
        if mode == "token":  # one score per depth; one loop leaves nothing to choose (and nothing to learn)
            self.routers = nn.ModuleDict({"depth": nn.Linear(dim, loops, **dd)} if loops > 1 else {})
        else:  # a router only for the loops that route (keys are the loop indices): an unused one would get no
            # gradient, which DDP without a static graph refuses
            self.routers = nn.ModuleDict({str(loop): nn.Linear(dim, 1, **dd)
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

    @property
    def loops(self) -> int:
        """The loops it was built for (test-time depth beyond them reuses the last one's routing)."""
        return len(self.capacities)

    def _trained_loop(self, loop: int) -> int:
        """The loop whose router and capacity serve `loop`: itself, or the last one beyond the trained loops."""
        return min(loop, self.loops - 1)

    def _routes(self, loop: int) -> bool:
        """Whether `loop` updates only some tokens: expert-choice below capacity 1.0, token-choice after loop 0."""
        if self.mode == "token":
            return loop > 0 and self.loops > 1
        return self.capacities[self._trained_loop(loop)] < 1.0

    def tokens_updated(self, num_tokens: int, loop: int) -> int:
        """How many tokens a loop runs the block on (pinned ones included).

        Args:
            num_tokens: Tokens in the sequence, prefix included.
            loop: The loop.

        Returns:
            P + ceil(capacity * (N - P)), or every token on a loop that does not route.
        """
        if not self._routes(loop):
            return num_tokens
        return gathered_count(num_tokens, self.pinned, self.capacities[self._trained_loop(loop)])

    def choose_depths(self, x: torch.Tensor) -> DepthChoice:
        """Token-choice: each routed token's depth, from the router's scores on `x`.

        In training (with gradients), also keeps the balancing loss for `auxiliary_loss`:
        `balance * D * sum_d f_d * p_d`, with f_d the share of tokens that chose depth d and
        p_d the mean probability of d (D depths); it is least when depths are even.

        Args:
            x: The stack's input, (B, N, C).

        Returns:
            The depths and their probabilities.
        """
        gathered_count(x.shape[1], self.pinned, 1.0)  # refuses a sequence of only pinned tokens
        router = self.routers["depth"]
        probs = router_scores(x, router.weight, router.bias, self.pinned).softmax(dim=-1)
        depth = probs.argmax(dim=-1)
        gate = probs.gather(-1, depth.unsqueeze(-1)).squeeze(-1)
        tracing = isinstance(probs, torch.fx.Proxy)  # a traced graph keeps no loss of the tracing pass
        if self.training and torch.is_grad_enabled() and self.balance > 0 and not tracing:
            share = F.one_hot(depth, self.loops).to(probs.dtype).mean(dim=(0, 1))
            self.pending_loss[:] = [self.balance * self.loops * (share * probs.mean(dim=(0, 1))).sum()]
        return DepthChoice(depth, gate)

    def draw_drop_masks(self, x: torch.Tensor, loops: int) -> torch.Tensor | list[RoutedDraw] | None:
        """What the stack draws once per forward pass and hands each application its share of:
        the wrapped block's stochastic-depth factors (see `TransformerBlock.draw_drop_masks`),
        and under token-choice the tokens' depths (`choose_depths`), so that all loops follow
        one decision.

        Args:
            x: The stack's input.
            loops: Applications to draw for.

        Returns:
            Expert-choice: the block's factors, or None. Token-choice: one `RoutedDraw` per
            application.
        """
        masks = self.block.draw_drop_masks(x, loops) if self._block_draws else None
        if self.mode != "token" or self.loops == 1:
            return masks
        choice = self.choose_depths(x)
        return [RoutedDraw(None if masks is None else masks[loop], choice) for loop in range(loops)]

    def _call_block(self, x: torch.Tensor, loop: int, drop_masks: torch.Tensor | None) -> torch.Tensor:
        extra = {} if drop_masks is None else {"drop_masks": drop_masks}
        return self.block(x, loop=loop, **extra) if self._block_aware else self.block(x, **extra)

    def _expert_choice(self, x: torch.Tensor, loop: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        router = self.routers[str(self._trained_loop(loop))]
        scores = router_scores(x, router.weight, router.bias, self.pinned).squeeze(-1)
        chosen = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # in token order
        return chosen, torch.sigmoid(scores.gather(1, chosen))

    def _token_choice(self, loop: int, num_tokens: int,
                      choice: DepthChoice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tokens loop `loop` gathers, their weights, and which of them it updates.

        The loops before it are chosen again (a few top-k over the routed tokens; nothing of
        the block runs), so that a token a full loop left out stops there for good: loop n
        updates only tokens that loop n - 1 updated.
        """
        going_on = torch.ones_like(choice.depth, dtype=torch.bool)
        for step in range(1, loop + 1):
            # beyond the trained loops the deepest tokens go on
            reaching = going_on & (choice.depth >= self._trained_loop(step))
            k = self.tokens_updated(num_tokens, step) - self.pinned
            priority = reaching.to(choice.gate.dtype) * 2 + choice.gate  # those reaching it first; gate in (0, 1)
            chosen = priority.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
            updates = reaching.gather(1, chosen)
            going_on = torch.zeros_like(going_on).scatter(1, chosen, updates)
        return chosen, choice.gate.gather(1, chosen), updates

    def forward(self, x: torch.Tensor, loop: int = 0, mix: nn.Module | None = None,
                drop_masks: torch.Tensor | RoutedDraw | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """Apply the block once, to the tokens this loop routes to it.

        Loops beyond those it was built for (test-time depth, `set_loops`) reuse the last
        loop's router and capacity (token-choice: the tokens of the greatest depth go on);
        the block itself is told the loop as it is.

        Args:
            x: Tokens of shape (B, N, C), the first `pinned` of them prefix tokens.
            loop: Index of this application.
            mix: The mix layer that follows this application in the stack (`NonLinearMix`),
                applied to the updated tokens only: a token that skips the loop skips its
                mix too.
            drop_masks: This application's share of `draw_drop_masks`: the block's
                stochastic-depth factors, or under token-choice a `RoutedDraw`. Without
                one, token-choice decides the depths from `x` itself.
            attn_mask: Accepted for timm's block interface; must be None (a mask over
                every token does not fit the gathered ones).
            is_causal: Likewise; must be False.

        Returns:
            Tensor of shape (B, N, C): chosen tokens updated, the others as they came.

        Raises:
            ValueError: For a negative loop, no token beyond the pinned ones, or an
                attention mask.
        """
        if loop < 0:
            raise ValueError(f"loop must be >= 0, got {loop}")
        if isinstance(attn_mask, torch.Tensor) or is_causal is True:  # fx's stand-ins for None and False pass
            raise ValueError("TokenRouting takes no attn_mask or is_causal: a mask over every token does not fit the "
                             "tokens a loop gathers; use routing=None for masked attention")
        draw = drop_masks if isinstance(drop_masks, RoutedDraw) else None
        block_masks = draw.drop_masks if draw is not None else drop_masks
        if not self._routes(loop):
            out = self._call_block(x, loop, block_masks)
            return out if mix is None else mix(out)
        batch, width = x.shape[0], x.shape[-1]  # indexed, not unpacked: torch.fx traces through here
        k = self.tokens_updated(x.shape[1], loop) - self.pinned
        updates = None  # which gathered tokens are updated, when not all are
        if self.mode == "token":
            choice = draw.choice if draw else self.choose_depths(x)
            chosen, weight, updates = self._token_choice(loop, x.shape[1], choice)
        else:
            chosen, weight = self._expert_choice(x, loop, k)
        weight, index = weight.to(x.dtype), chosen + self.pinned
        if self.pinned:
            prefix = torch.arange(self.pinned, device=x.device).expand(batch, -1)
            index = torch.cat([prefix, index], dim=1)
            weight = torch.cat([weight.new_ones(batch, self.pinned), weight], dim=1)
            if updates is not None:
                updates = torch.cat([updates.new_ones(batch, self.pinned), updates], dim=1)
        index = index.unsqueeze(-1).expand(-1, -1, width)
        tokens = x.gather(1, index)
        updated = tokens + weight.unsqueeze(-1) * (self._call_block(tokens, loop, block_masks) - tokens)
        if mix is not None:
            updated = mix(updated)
        if updates is not None:  # gathered as keys only: neither the block nor the mix changes them
            updated = torch.where(updates.unsqueeze(-1), updated, tokens)
        return x.scatter(1, index, updated.to(x.dtype))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, capacities={self.capacities}, pinned={self.pinned}"
