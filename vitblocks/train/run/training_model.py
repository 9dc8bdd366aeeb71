"""The model as the training step calls it: wrapped for DDP under torchrun, compiled by `model.compile`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vitblocks.layers import compile_regions
from vitblocks.train.config.schema import TrainConfig
from vitblocks.train.errors import ConfigError
from vitblocks.train.process.distributed import Runtime
from vitblocks.train.run.compile_modes import compile_mode, graphs_refusals

__all__ = ["TrainingModel", "wrap_for_training"]


class TrainingModel(NamedTuple):
    """What the training step calls, and how it was made.

    Attributes:
        module: The model, wrapped in DDP and compiled as configured (the model itself
            when neither applies).
        static_graph: Whether DDP was told the graph is static.
        graphs: Whether the step is replayed as CUDA graphs (`model.compile="graphs"`).
    """

    module: nn.Module
    static_graph: bool
    graphs: bool


def wrap_for_training(model: nn.Module, config: TrainConfig, runtime: Runtime) -> TrainingModel:
    """Wrap a model for the training step: DDP when distributed, then the configured compile mode.

    Args:
        model: The model, on its device (regional compilation changes it in place).
        config: `model.static_graph`, `model.compile`, `optim.accum_steps`.
        runtime: The process group and device.

    Returns:
        The training model.

    Raises:
        ConfigError: For a static graph with gradient accumulation under DDP, or a compile
            mode that cannot run here (with the reason).
    """
    static_graph = config.model.static_graph
    if static_graph is None:
        static_graph = config.optim.accum_steps == 1
    if runtime.distributed and static_graph and config.optim.accum_steps > 1:
        raise ConfigError("model.static_graph=True with optim.accum_steps > 1 fails in torch's DDP reducer (the "
                          "first backward runs under no_sync); set model.static_graph=None")
    train_model: nn.Module = model
    device = runtime.device
    if runtime.distributed:
        # gradients as views of DDP's buckets: the channels-last stem's gradients then need no stride match;
        # a static graph (the same parameters used in the same order every step, which these models keep: drop
        # path multiplies by masks, it never skips) lets DDP reuse its bucket order and take checkpointing
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                              gradient_as_bucket_view=True, static_graph=static_graph)
    mode = compile_mode(config.model.compile, device)
    if mode == "regional":
        try:
            compile_regions(model)  # in place, so the DDP wrapper runs the compiled blocks
        except ValueError as error:
            raise ConfigError(f"model.compile='regional': {error} (set model.compile=True)") from None
    elif mode == "graphs":
        refusals = graphs_refusals(model, device, config.model.grad_checkpointing)
        if refusals:
            raise ConfigError("model.compile='graphs' cannot run here: " + "; ".join(refusals))
        train_model = torch.compile(train_model, mode="reduce-overhead")
    elif mode == "model":
        train_model = torch.compile(train_model)
    return TrainingModel(train_model, static_graph, mode == "graphs")
