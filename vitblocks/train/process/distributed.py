"""torch.distributed setup for runs launched by torchrun (one process per device)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vitblocks.train.errors import StoppedElsewhere


@dataclass(frozen=True)
class Runtime:
    """Where this process runs.

    Attributes:
        rank: Global rank (0 when not distributed).
        world_size: Number of processes.
        device: This process's device.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1


def setup() -> Runtime:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs), if any.

    Returns:
        This process's rank, world size and device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Runtime(rank, world_size, device)


def teardown() -> None:
    """Leave the process group."""
    _flag_groups.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Sum numbers over all processes.

    Args:
        values: This process's numbers.
        runtime: The process group.

    Returns:
        The sums (the values themselves when not distributed).
    """
    if not runtime.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


_flag_groups: dict[str, object] = {}


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """Whether `flag` is set on any process; every process gets the same answer.

    The vote travels over a CPU (gloo) group, so on GPUs it waits for no device work:
    the trainer asks it after every optimizer step (has a stop signal arrived?).

    Args:
        flag: This process's flag.
        runtime: The process group.

    Returns:
        The flag itself when not distributed.
    """
    if not runtime.distributed:
        return flag
    backend = dist.get_backend()
    if backend not in _flag_groups:
        _flag_groups[backend] = None if backend == "gloo" else dist.new_group(backend="gloo")
    vote = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=_flag_groups[backend])
    return bool(vote.item())


def gather(value: Any, runtime: Runtime) -> list[Any]:
    """Every process's `value`, in rank order, on every process.

    Args:
        value: This process's value (picklable: tensors, numbers, containers).
        runtime: The process group.

    Returns:
        One value per rank (`[value]` when not distributed).
    """
    if not runtime.distributed:
        return [value]
    values: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(values, value)
    return values


def together(work: Callable[[], None], runtime: Runtime) -> None:
    """Run `work`; if it raises on any process, raise on every process.

    Work that can fail on one process alone (a file the main process writes, a worker of its
    loader) would otherwise leave the others waiting in their next collective step.

    Args:
        work: What this process runs (nothing, on processes that have no part in it).
        runtime: The process group.

    Raises:
        Exception: What `work` raised; on the other processes, `StoppedElsewhere`.
    """
    error = None
    try:
        work()
    except Exception as failed:  # noqa: BLE001 - raised again below, on every process
        error = failed
    if any_rank(error is not None, runtime):
        raise error or StoppedElsewhere(f"process {runtime.rank} stopped because another process failed; see its "
                                        "message")
