"""Where the optimizer update in progress began, for a stop inside it.

With `optim.accum_steps` > 1 an update spans several batches. A run that must stop
between two of them (a loader worker died, so the next batch will not come) cannot
finish the update, and a checkpoint of the state in between would count batches whose
gradients it does not hold. Under torchrun, a process whose own batch came stops when
another process's worker died, after drawing its batch's random erasing. The trainer
marks each update's start in those cases (`UpdateStart.take`: a few counters, the random
streams and the normalization statistics, small next to a step) and, stopping inside
an update, returns there (`restore`), so the checkpoint is the last finished step and a
resumed run repeats the update exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitblocks.train.outputs.checkpoint import rng_state, set_rng_state
from vitblocks.train.outputs.state import TrainingState

__all__ = ["UpdateStart"]


@dataclass
class UpdateStart:
    """The state of a run at the first batch of an update.

    Attributes:
        epoch: The epoch it is in.
        counters: `TrainingState`'s batch and running totals.
        rng: Every random generator (`vitblocks.train.outputs.checkpoint.rng_state`).
        unread_losses: How many losses were waiting to be read from the device.
        norm_statistics: BatchNorm running statistics, which forward passes update.
    """

    epoch: int
    counters: tuple[int, float, int, int, int]
    rng: dict[str, Any]
    unread_losses: int
    norm_statistics: dict[str, torch.Tensor]

    @classmethod
    def take(cls, state: TrainingState, model: nn.Module, unread_losses: int) -> UpdateStart:
        """Mark the start of an update.

        Args:
            state: The run's position.
            model: The model (its running statistics are copied).
            unread_losses: Losses not yet read from the device.

        Returns:
            The mark.
        """
        counters = (state.batch, state.epoch_loss, state.epoch_batches, state.epoch_images, state.epoch_samples)
        statistics = {name: buffer.detach().clone() for name, buffer in model.named_buffers()
                      if "running_mean" in name or "running_var" in name or "num_batches_tracked" in name}
        return cls(state.epoch, counters, rng_state(), unread_losses, statistics)

    def restore(self, state: TrainingState, model: nn.Module) -> None:
        """Return the run to the mark (the caller drops the losses after `unread_losses`).

        Args:
            state: The run's position.
            model: The model.
        """
        state.batch, state.epoch_loss, state.epoch_batches, state.epoch_images, state.epoch_samples = self.counters
        set_rng_state(self.rng)
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in self.norm_statistics.items():
                buffers[name].copy_(value)
