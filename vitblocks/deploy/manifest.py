"""The manifest beside each artifact: what model it is, how to feed it, how it compared with eager.

`model.onnx` gets `model.onnx.json` (likewise `model.pt2.json`, `model_int8.pt2.json`):

    {"format": "int8", "artifact": "model_int8.pt2", "model": "sret_t", "source": "runs/q/best.pth",
     "batch": "dynamic", "input_size": [3, 32, 32], "mean": [...], "std": [...], "crop_pct": 0.875,
     "crop_mode": "center", "interpolation": "bicubic", "classes": ["0", "1", ...],
     "versions": {"torch": ..., "timm": ..., "vitblocks": ...},
     "check": {"images": 64, "data": "the run's validation split (digits)",
               "max_abs_logit_diff": 0.03, "top1_agreement": 1.0},
     "calibration": {"images": 256, "data": ...}}

`vitblocks.predict` reads it to preprocess images and name classes without the model's
code or the run folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import timm
import torch

from vitblocks.deploy.errors import DeployError
from vitblocks.deploy.formats import FORMATS, readable_by_others
from vitblocks.deploy.preprocess import check_preprocessing
from vitblocks.deploy.source import Source
from vitblocks.io import replacing

SUFFIXES = (".onnx", ".pt2")
"""The suffixes of artifact files."""


def manifest_path(artifact: str | os.PathLike) -> Path:
    """The manifest's path beside an artifact.

    Args:
        artifact: The artifact file.

    Returns:
        The same path with ".json" appended.
    """
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def versions() -> dict[str, str]:
    """The versions of the libraries an artifact was built with.

    Returns:
        torch, timm and vitblocks, and onnxruntime / torchao where installed.
    """
    found = {"torch": torch.__version__, "timm": timm.__version__}
    for package in ("vitblocks", "onnxruntime", "torchao"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_manifest(artifact: Path, fmt: str, source: Source, batch: int | None, check: dict[str, Any],
                   calibration: dict[str, Any] | None = None) -> Path:
    """Write the manifest of an artifact.

    Args:
        artifact: The artifact file.
        fmt: Its format.
        source: What it was exported from.
        batch: Its fixed batch size (None: dynamic).
        check: The comparison with eager (`compare`), with `images` and `data`.
        calibration: int8's calibration images: `images` and `data`.

    Returns:
        The manifest's path.
    """
    manifest = {"format": fmt, "artifact": artifact.name, "model": source.name, "source": source.origin,
                "batch": "dynamic" if batch is None else batch,
                **{key: list(value) if isinstance(value, tuple) else value
                   for key, value in source.preprocessing.items()},
                "classes": source.classes, "versions": versions(), "check": check}
    if calibration is not None:
        manifest["calibration"] = calibration
    path = manifest_path(artifact)
    with replacing(path) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n")
    readable_by_others(path)
    return path


def find_artifact(spec: str | os.PathLike) -> Path | None:
    """The artifact named by a path: the file itself, or the one artifact in a folder.

    Args:
        spec: An artifact file, or a folder holding artifacts with their manifests.

    Returns:
        The artifact, or None if `spec` names no artifact (a run folder, a checkpoint, a
        model name).

    Raises:
        DeployError: If a folder holds several artifacts, or an artifact has no manifest.
    """
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and manifest_path(p).is_file())
        if len(found) > 1:
            raise DeployError(f"{path} holds {len(found)} exports ({', '.join(p.name for p in found)}): name one of "
                              "them")
        return found[0] if found else None
    if path.is_file() and path.suffix in SUFFIXES:
        if not manifest_path(path).is_file():
            raise DeployError(f"{path} has no manifest beside it ({manifest_path(path).name}): export it with "
                              "python -m vitblocks.export, which writes both")
        return path
    return None


def read_manifest(artifact: Path) -> dict[str, Any]:
    """Read an artifact's manifest.

    Args:
        artifact: The artifact file.

    Returns:
        The manifest.

    Raises:
        DeployError: If it cannot be read or misses what prediction needs.
    """
    path = manifest_path(artifact)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DeployError(f"the manifest {path} cannot be read ({error}): export the model again") from None
    needed = {"format", "input_size", "mean", "std", "classes", "batch"}
    if not isinstance(manifest, dict) or not needed <= manifest.keys():
        raise DeployError(f"{path} is not a vitblocks export manifest (it needs {', '.join(sorted(needed))}): "
                          "export the model again")
    problems = []
    if not isinstance(manifest["format"], str) or manifest["format"] not in FORMATS:
        problems.append(f"format {manifest['format']!r} is not one of {', '.join(FORMATS)}")
    batch = manifest["batch"]
    if batch != "dynamic" and not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        problems.append(f"batch {batch!r} is neither 'dynamic' nor a size >= 1")
    classes = manifest["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        problems.append("classes must be a list of names")
    try:
        check_preprocessing(manifest)
    except DeployError as error:
        problems.append(str(error).split(":")[0])
    if problems:
        raise DeployError(f"the manifest {path} is damaged ({'; '.join(problems)}): export the model again")
    return manifest


def compare(reference: Callable[[torch.Tensor], torch.Tensor], candidate: Callable[[torch.Tensor], torch.Tensor],
            images: torch.Tensor, batch: int) -> dict[str, float]:
    """How far one model's logits are from another's on the same images.

    Args:
        reference: The eager model (or any function of a batch).
        candidate: The artifact.
        images: The images, preprocessed.
        batch: Batch size to run them in.

    Returns:
        `max_abs_logit_diff` and `top1_agreement` (a fraction).
    """
    diff, agree = 0.0, 0
    with torch.no_grad():
        for chunk in images.split(batch):
            expected, got = reference(chunk).float(), candidate(chunk).float()
            diff = max(diff, (expected - got).abs().max().item())
            agree += int((expected.argmax(-1) == got.argmax(-1)).sum())
    return {"max_abs_logit_diff": float(f"{diff:.3g}"), "top1_agreement": round(agree / max(len(images), 1), 4)}
