"""The run header: what a run is, logged before it starts and recorded by the trackers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vitblocks.train.data.feed import describe_feed
from vitblocks.train.run.compile_modes import describe_compile

if TYPE_CHECKING:
    from vitblocks.train.run.hooks import RunView


def header_text(run: RunView, static_graph: bool = False) -> str:
    """The run header: model size, data and how it is fed, device, the step, output.

    Args:
        run: The run.
        static_graph: DDP runs with a static graph (`training_model.wrap_for_training`).

    Returns:
        Five lines.
    """
    config, data = run.config, run.data
    params = sum(p.numel() for p in run.model.parameters())
    size, training = f"{params:,} parameters", run.model.training
    try:
        from vitblocks.summary import summarize

        with torch.random.fork_rng(devices=[]):  # a resumed run's random streams stay untouched
            macs = summarize(run.model, config.data.img_size)[-1].macs
        size += f", {macs / 1e9:.3f} GMACs per image at {config.data.img_size} px"
    except Exception:  # noqa: BLE001 - a model the counter cannot run (e.g. on a GPU): its size is enough
        pass
    finally:
        run.model.train(training)
    source = config.data.dataset + (f" {config.data.root}" if config.data.dataset == "imagefolder" else "")
    start = "resuming at " if run.resumed else ""
    return (
        f"model    {config.model.name}: {size}\n"
        f"data     {source}: {len(data.train_set):,} train / {len(data.val_set):,} val images, "
        f"{len(data.classes)} classes{_per_class(data.train_set)}; "
        f"{describe_feed(data.train_loader(run.device), config.data.workers)}\n"
        f"runs on  {run.device} x {run.runtime.world_size}, {config.precision}, "
        f"attention backend {config.model.backend}\n"
        f"step     {describe_step(run, static_graph)}\n"
        f"output   {run.output_dir} ({start}epoch {run.state.epoch + 1} of {config.epochs})"
    )


def describe_step(run: RunView, static_graph: bool = False) -> str:
    """What one training step runs, and why, as the run header states it.

    Args:
        run: The run.
        static_graph: DDP runs with a static graph.

    Returns:
        Compile mode and its reason, the optimizer's kernel, and how often the step
        waits for the device.
    """
    config = run.config
    optimizer = type(run.optimizer).__name__
    defaults = run.optimizer.defaults
    kernel = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") is not False else "for-loop"
    accumulate = f", {config.optim.accum_steps} batches per update" if config.optim.accum_steps > 1 else ""
    ddp = ""
    if run.runtime.distributed:
        ddp = "; DDP with " + ("a static graph, " if static_graph else "") + "gradients as bucket views" + (
            ", all-reducing only each update's last batch (no_sync)" if config.optim.accum_steps > 1 else "")
    return (f"{describe_compile(config.model.compile, run.device)}; {optimizer} ({kernel}){accumulate}; "
            f"losses read from the device every {config.log_every} steps{ddp}")


def _per_class(dataset: Any) -> str:
    """The training images per class of an ImageFolder dataset, as the header shows them."""
    counts = dataset.class_counts() if hasattr(dataset, "class_counts") else None
    if not counts:
        return ""
    if len(counts) <= 10:
        return " (train images per class: " + ", ".join(f"{name} {n}" for name, n in counts.items()) + ")"
    low, high = min(counts, key=counts.get), max(counts, key=counts.get)
    return f" (train images per class: {counts[low]} ({low}) to {counts[high]} ({high}))"
