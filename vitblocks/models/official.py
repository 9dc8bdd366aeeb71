"""Load checkpoints of the official SReT code, and export to its layout.

The official code stores a stage's blocks as one flat list in which each shared block
appears once per loop and each NonLinearMix layer once: with L loops, unique block j
sits at positions 2*L*j + 2*l (l = 0..L-1) and mix layer m at 2*m + 1. Its residual
scalars are `coefficient{1..4}.bias`; pooling layers are `pools.{s}`; the position map
is a bare `pos_embed` parameter.

    model = load_official_checkpoint("SReT_T.pth", "sret_t")
    torch.save({"model": export_official_state_dict(model)}, "SReT_T_roundtrip.pth")

Checkpoints are read through `vitblocks.io.read_checkpoint` (`weights_only=True`): a
file that holds anything but tensors and plain containers is refused rather than executed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import timm
import torch

from vitblocks.io import CheckpointError, read_checkpoint
from vitblocks.layers import resize_position_map
from vitblocks.layers.routing import TokenRouting

if TYPE_CHECKING:
    from vitblocks.models.sret import SReT

_BLOCK_KEYS = {
    "norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "norm2": "norm2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "coefficient1": "skip_scale1", "coefficient2": "branch_scale1",
    "coefficient3": "skip_scale2", "coefficient4": "branch_scale2",
}
_MIX_KEYS = {"norm1": "norm", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "coefficient1": "skip_scale",
             "coefficient2": "branch_scale"}
_SCALARS = {"coefficient1", "coefficient2", "coefficient3", "coefficient4"}


def is_official_state_dict(state_dict: dict[str, Any]) -> bool:
    """Whether a state dict uses the official code's key layout.

    Args:
        state_dict: Any state dict.

    Returns:
        True if it has the official `transformers.*` / `pools.*` keys.
    """
    return any(k.startswith(("transformers.", "pools.")) for k in state_dict)


def _param_pairs(prefix_ours: str, prefix_official: str, table: dict[str, str]) -> list[tuple[str, str]]:
    pairs = []
    for official, ours in table.items():
        if official in _SCALARS:
            pairs.append((f"{prefix_ours}.{ours}", f"{prefix_official}.{official}.bias"))
        else:
            for leaf in ("weight", "bias"):
                pairs.append((f"{prefix_ours}.{ours}.{leaf}", f"{prefix_official}.{official}.{leaf}"))
    return pairs


def official_key_map(model: SReT) -> dict[str, list[str]]:
    """For every state-dict key of `model`, the official keys that hold the same tensor.

    Shared-block parameters map to one official key per loop; everything else to one.

    Args:
        model: A vitblocks SReT.

    Returns:
        Our key -> list of official keys.

    Raises:
        CheckpointError: If the model's mix layers are not one per loop (the official
            layout has no place for shared or absent mix layers), or it routes tokens.
    """
    mapping: dict[str, list[str]] = {}
    for key in model.state_dict():
        if key.startswith("stages.") or key == "pos_embed.weight":
            continue
        mapping[key] = [key]
    mapping["pos_embed.weight"] = ["pos_embed"]
    for s, stage in enumerate(model.stages):
        if s > 0:
            mapping[f"stages.{s}.downsample.conv.weight"] = [f"pools.{s - 1}.conv.weight"]
            mapping[f"stages.{s}.downsample.conv.bias"] = [f"pools.{s - 1}.conv.bias"]
        for j, recursive in enumerate(stage.blocks):
            if isinstance(getattr(recursive, "block", None), TokenRouting):
                raise CheckpointError("the official layout has no token routing: a SReT built with routing= has "
                                      "routers the official code cannot hold; convert a model without routing")
            if recursive.shared_mix:
                raise CheckpointError("the official layout needs one NonLinearMix per loop (mix='per_loop')")
            loops = recursive.loops
            for loop in range(loops):
                official = f"transformers.{s}.blocks.{2 * loops * j + 2 * loop}"
                for ours_key, official_key in _param_pairs(f"stages.{s}.blocks.{j}.block", official, _BLOCK_KEYS):
                    mapping.setdefault(ours_key, []).append(official_key)
                mix = f"transformers.{s}.blocks.{2 * (loops * j + loop) + 1}"
                for ours_key, official_key in _param_pairs(f"stages.{s}.blocks.{j}.mix.{loop}", mix, _MIX_KEYS):
                    mapping[ours_key] = [official_key]
    return mapping


def resize_position_weight(state_dict: dict[str, torch.Tensor], model: SReT) -> dict[str, torch.Tensor]:
    """Resize the position map of a vitblocks-layout state dict to the model's grid.

    Args:
        state_dict: Weights in vitblocks layout (modified in place).
        model: The model they are for.

    Returns:
        `state_dict`.
    """
    pos = state_dict.get("pos_embed.weight")
    target = model.pos_embed.weight.shape
    if pos is not None and pos.shape != target and pos.shape[:2] == target[:2]:
        state_dict["pos_embed.weight"] = resize_position_map(pos, tuple(target[-2:]))
    return state_dict


def convert_official_state_dict(state_dict: dict[str, torch.Tensor], model: SReT) -> dict[str, torch.Tensor]:
    """Turn an official-layout state dict into one that `model.load_state_dict` takes.

    The position map is resized (bicubic) when the model runs at another resolution.

    Args:
        state_dict: The official `model` entry of a checkpoint.
        model: The vitblocks SReT the weights are for.

    Returns:
        A state dict in vitblocks layout.

    Raises:
        CheckpointError: On missing or unexpected keys, shape mismatches, or two stored
            copies of a shared block that differ.
    """
    mapping = official_key_map(model)
    expected = model.state_dict()
    known = {k for keys in mapping.values() for k in keys}
    missing = sorted(k for k in known if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in known)
    if missing or unexpected:
        raise CheckpointError(
            "the checkpoint does not match this model's official layout"
            + (f"; missing {len(missing)} keys, e.g. {missing[:4]}" if missing else "")
            + (f"; unexpected {len(unexpected)} keys, e.g. {unexpected[:4]}" if unexpected else "")
            + ". Is it truncated, or for another variant (T / LT / S, loops per block)?"
        )
    converted = {}
    for ours, official_keys in mapping.items():
        tensor = state_dict[official_keys[0]]
        for other in official_keys[1:]:
            if not torch.equal(state_dict[other], tensor):
                raise CheckpointError(
                    f"{official_keys[0]} and {other} are stored copies of one shared block but differ; "
                    "the checkpoint is corrupt or was not written by the official SReT code"
                )
        if ours == "pos_embed.weight" and tensor.shape != expected[ours].shape:
            if tensor.shape[:2] != expected[ours].shape[:2]:
                raise CheckpointError(f"pos_embed has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(expected[ours].shape)}")
            tensor = resize_position_map(tensor, tuple(expected[ours].shape[-2:]))
        elif tensor.shape != expected[ours].shape:
            raise CheckpointError(
                f"{official_keys[0]} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[ours].shape)} for {ours}; the checkpoint is for another variant"
            )
        converted[ours] = tensor
    return converted


def export_official_state_dict(model: SReT) -> dict[str, torch.Tensor]:
    """The model's weights in the official code's layout.

    Args:
        model: A vitblocks SReT with one NonLinearMix per loop.

    Returns:
        Official key -> tensor; a shared block's tensors appear once per loop.
    """
    ours = model.state_dict()
    return {official: ours[key] for key, officials in official_key_map(model).items() for official in officials}


def load_official_checkpoint(path: str | os.PathLike, model: str | SReT = "sret_t", **kwargs: Any) -> SReT:
    """Build a vitblocks SReT with the weights of an official `SReT*.pth` file.

    Args:
        path: The checkpoint (a dict with a `model` entry, as the official code saves).
        model: A registered name such as "sret_t" / "sret_lt" / "sret_s" (with
            `kwargs` for `timm.create_model`, e.g. `img_size=384`), or a model instance.
        **kwargs: Passed to `timm.create_model` when `model` is a name.

    Returns:
        The model, in eval mode, with identical outputs to the official code (use
        `eval_permutation="official"` to also repeat its random eval-time permutation).

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If the file cannot be read or does not match the model.
    """
    state_dict = read_checkpoint(path)
    if isinstance(model, str):
        model = timm.create_model(model, **kwargs)
    if not is_official_state_dict(state_dict):
        raise CheckpointError(
            f"{os.fspath(path)!r} is not in the official SReT layout (no 'transformers.*' keys); "
            "load vitblocks checkpoints with model.load_state_dict"
        )
    model.load_state_dict(convert_official_state_dict(state_dict, model))
    return model.eval()
