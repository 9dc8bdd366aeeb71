"""Measuring the tensor memory a piece of code needs, on any device (CPU included)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """Track the bytes of tensor storage created inside the block, and their peak.

    Every storage an operator returns is counted until it is freed, so `peak` is the
    largest amount of memory held at once by tensors made in the block (activations,
    gradients, temporaries), whatever the device; tensors that existed before (weights,
    inputs) are not counted. Python-level dispatch makes the code run slower: use it
    for measuring, not in training.

    Attributes:
        peak: Most bytes held at once.
        current: Bytes still held (e.g. parameter gradients after a backward pass).

    Examples:
        >>> import torch
        >>> with PeakMemory() as memory:
        ...     y = torch.ones(1024) * 2   # the ones are freed after the product is made
        >>> memory.peak, memory.current
        (8192, 4096)
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            # PyTorch keeps one Python object per live storage, so its id identifies the storage
            key = id(storage)
            if storage.nbytes() and key not in self._live:
                self._live[key] = storage.nbytes()
                self.current += storage.nbytes()
                weakref.finalize(storage, self._release, key)
        self.peak = max(self.peak, self.current)
        return out
