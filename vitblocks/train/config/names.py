"""Names a config chooses among that other rooms act on: kept here so that checking a
config needs neither the data room nor the run room."""

from __future__ import annotations

__all__ = ["COMPILE_MODES", "TIMM_PREFIXES", "is_timm_dataset"]

COMPILE_MODES = ("none", "model", "regional", "graphs")
"""`model.compile` values: eager; `torch.compile(model)`; one compiled application per shared
block (`vitblocks.compile_regions`); `torch.compile(model, mode="reduce-overhead")`, whose
forward and backward replay as CUDA graphs (with the fused optimizer, a step then launches
a handful of kernels from the host)."""

TIMM_PREFIXES = ("wds", "hfds", "hfids", "tfds", "torch")
"""`data.dataset` prefixes passed to timm's `create_dataset`."""


def is_timm_dataset(name: str) -> bool:
    """Whether a `data.dataset` value names a dataset of timm's `create_dataset`.

    Args:
        name: The config value.

    Returns:
        True for "wds/...", "hfds/...", "hfids/...", "tfds/..." and "torch/...".

    Examples:
        >>> is_timm_dataset("wds/imagenet"), is_timm_dataset("imagefolder")
        (True, False)
    """
    prefix, slash, rest = name.partition("/")
    return bool(slash and rest) and prefix.lower() in TIMM_PREFIXES
