"""Early exit of whole images: after a loop, a shared head scores each image; a confident one stops.

Recursion applies the same blocks again and again; an easy image may be decided after
fewer applications (ThinkingViT, 2025; the halting of A-ViT, CVPR 2022, per image).
`EarlyExit` runs a sequence of layers one block application at a time (a `Recursive` or
`SharedSequence` position by position, see `SharedStack.apply_position`):

- **Exits** are positions of that sequence, counted over every application (a stage of
  three `Recursive` blocks of two loops has 6 positions, 0-5). After an exit the model's
  own head (norm, pool, classifier: shared by every exit, no new parameters) scores the
  images.
- **Inference.** An image whose top softmax probability reaches `threshold` stops: its
  tokens are kept as they are, and the rest of the batch is compacted, so later positions
  run on fewer images (the shapes then depend on the data: eager only). The model's final
  head reads the stopped images' tokens, so their logits are exactly their exit's. With
  `threshold` above 1 (the default) no image stops and the model is exactly the static one.
- **Training** (deep supervision): every image runs every position; the logits at each
  exit are kept for the trainer (`exit_logits`), which adds `weight / exits` times the
  task loss of each to the loss of the final output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitblocks.layers.option_dict import check_option_dict
from vitblocks.layers.routing import Pending, RoutedDraw
from vitblocks.layers.shared_stack import SharedStack

__all__ = ["EXIT_OPTIONS", "EarlyExit", "check_exit_options", "exit_logits", "set_exit_threshold"]

EXIT_OPTIONS = ("after", "threshold", "weight")
"""What a model's `early_exit=` dict takes."""

NEVER = 2.0
"""A threshold no softmax probability reaches: no image stops."""


def check_exit_options(early_exit: dict | None) -> None:
    """Refuse a model's `early_exit=` setting that is not a dict of `EXIT_OPTIONS`.

    Args:
        early_exit: E.g. `{"threshold": 0.9}`, or None for no exits.

    Raises:
        ValueError: Naming what is wrong and the options there are.
    """
    check_option_dict(early_exit, "early_exit", "exit options", "{'threshold': 0.9}", EXIT_OPTIONS)


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"exit threshold must be a number > 0 (the top softmax probability at which an image stops; "
                         f"above 1: none stops), got {threshold!r}")
    return float(threshold)


def _rows(draw: Any, keep: torch.Tensor) -> Any:
    """A stack's per-forward draws for the kept images only (inference draws no stochastic-depth masks)."""
    if isinstance(draw, list):
        return [_rows(d, keep) for d in draw]
    if isinstance(draw, RoutedDraw):
        return draw.rows(keep)
    return None if draw is None else draw[:, :, keep]


class EarlyExit(nn.Module):
    """Exits after chosen block applications of a sequence of layers, scored by a shared head.

    It has no parameters (the head is the model's own); models hold it as `early_exit` and
    call `run` where they would run the layers.

    Args:
        after: Positions after which images may exit (see the module docs), or None for
            every position but the last.
        threshold: Top softmax probability at which an image stops at inference; above 1
            none does (the model is then exactly the static one).
        weight: Total weight of the exits' losses in training, shared evenly among them.

    Raises:
        ValueError: For a bad threshold, weight or exit position.

    Examples:
        >>> from vitblocks.layers import Recursive, TransformerBlock
        >>> layers = [Recursive(TransformerBlock(dim=8, num_heads=2), loops=3)]
        >>> head = torch.nn.Linear(8, 4)
        >>> exits = EarlyExit(threshold=0.3).eval()
        >>> exits.run(layers, torch.randn(5, 10, 8), lambda tokens: head(tokens.mean(1))).shape
        torch.Size([5, 10, 8])
    """

    def __init__(self, after: Sequence[int] | None = None, threshold: float = NEVER, weight: float = 0.5) -> None:
        super().__init__()
        self.after = None if after is None else tuple(after)
        if self.after is not None and (not self.after or any(isinstance(p, bool) or not isinstance(p, int) or p < 0
                                                             for p in self.after)):
            raise ValueError(f"early_exit after must list positions (ints >= 0) at which images may exit, "
                             f"got {after!r}")
        self.threshold = _check_threshold(threshold)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"early_exit weight must be a number >= 0 (the exits' share of the loss), got {weight!r}")
        self.weight = float(weight)
        self.pending = Pending()  # the exits' logits of the last training pass, until taken
        self.positions = 0  # applications in the sequence it last ran
        self.reset_counts()

    def reset_counts(self) -> None:
        """Start counting anew the images that stop at each exit (`positions_run`)."""
        self.exited: list[int] = []  # images that stopped at each exit, over inference passes with a threshold
        self.images = 0  # images in those passes

    def exits(self, positions: int) -> tuple[int, ...]:
        """The exit positions of a sequence of `positions` applications.

        Args:
            positions: Applications in the sequence.

        Returns:
            The positions, sorted.

        Raises:
            ValueError: For a position the sequence does not have.
        """
        if self.after is None:
            return tuple(range(positions - 1))
        beyond = [p for p in self.after if p >= positions]
        if beyond:
            raise ValueError(f"early_exit after={self.after}: the layers have {positions} positions (0 to "
                             f"{positions - 1}); position {beyond[0]} is not one of them: give positions in that "
                             "range, or after=None for every one but the last")
        return tuple(sorted(set(self.after)))

    def run(self, layers: Sequence[nn.Module], x: torch.Tensor,
            head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run the layers, one block application at a time, with the exits.

        Args:
            layers: The layers, in order (stacks run position by position, others whole).
            x: Tokens (B, N, C); every layer keeps this shape.
            head: Tokens of some images to their logits.

        Returns:
            The tokens after the last position, of every image (those that stopped: as
            they were when they stopped).
        """
        steps = [(layer, p) for layer in layers
                 for p in range(layer.positions if isinstance(layer, SharedStack) else 1)]
        exits = set(self.exits(len(steps)))
        if len(steps) != self.positions:  # another depth (set_loops): counts of the old one would not add up
            self.positions = len(steps)
            self.reset_counts()
        stopping = not self.training and self.threshold <= 1.0
        final, rows, draws = (torch.empty_like(x), torch.arange(x.shape[0], device=x.device), None) if stopping else \
            (None, None, None)
        self.pending.clear()
        if stopping:
            self.images += x.shape[0]
            self.exited += [0] * (len(exits) - len(self.exited))
        exit_number = 0
        for index, (layer, position) in enumerate(steps):
            if isinstance(layer, SharedStack):
                if position == 0:
                    draws = layer.draw(x)
                if layer.grad_checkpointing and self.training and torch.is_grad_enabled():  # as the stack would
                    x = checkpoint(layer.apply_position, x, position, draws, use_reentrant=False)
                else:
                    x = layer.apply_position(x, position, draws)
            else:
                x = layer(x)
            if index not in exits:
                continue
            if self.training:
                self.pending.append(head(x))
            elif stopping:
                confident = head(x).float().softmax(dim=-1).amax(dim=-1) >= self.threshold
                self.exited[exit_number] += int(confident.sum())
                exit_number += 1
                final[rows[confident]] = x[confident]
                keep = (~confident).nonzero().squeeze(1)
                x, rows = x[keep], rows[keep]
                if not x.shape[0]:  # every image has stopped
                    return final
                if isinstance(layer, SharedStack) and position + 1 < layer.positions:
                    draws = _rows(draws, keep)
        if not stopping:
            return x
        final[rows] = x
        return final

    def positions_run(self) -> float | None:
        """Mean block applications per image over the inference passes with a threshold of at most 1
        since `reset_counts`.

        Returns:
            The mean (all of the sequence's positions if no image stopped), or None before any
            such pass.
        """
        if not self.images:
            return None
        exits = self.exits(self.positions)
        done = sum(count * (position + 1) for count, position in zip(self.exited, exits))
        return (done + (self.images - sum(self.exited)) * self.positions) / self.images

    def extra_repr(self) -> str:
        return f"after={self.after}, threshold={self.threshold}, weight={self.weight}"


def exit_logits(model: nn.Module) -> list[tuple[float, torch.Tensor]]:
    """Take the exits' logits of the model's last training pass, with the weight of each one's loss.

    Each is handed out once.

    Args:
        model: Any module (a DDP wrapper too).

    Returns:
        (weight, logits) for every exit of every `EarlyExit` in the model.
    """
    taken = []
    for module in model.modules():
        if isinstance(module, EarlyExit) and module.pending:
            share = module.weight / len(module.pending)
            taken += [(share, logits) for logits in module.pending]
            module.pending.clear()
    return taken


def set_exit_threshold(model: nn.Module, threshold: float) -> int:
    """Set the exit threshold of every `EarlyExit` in a model (test-time, like `set_loops`).

    Args:
        model: The model.
        threshold: Top softmax probability at which an image stops; above 1 none does.

    Returns:
        How many `EarlyExit` modules were set.

    Raises:
        ValueError: For a bad threshold, or a model without exits.
    """
    threshold = _check_threshold(threshold)
    found = [m for m in model.modules() if isinstance(m, EarlyExit)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no early exits: build it with early_exit={{...}} (the "
                         "trainer's --set \"model.kwargs.early_exit={}\", or timm.create_model('sret_t', "
                         "early_exit={'threshold': 0.9})); the exits use the model's own head, so weights trained "
                         "without them load too")
    for module in found:
        module.threshold = threshold
    return len(found)
