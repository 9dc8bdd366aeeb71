"""The deployment formats: how each is written from a model and run again.

| format | file | runs with |
|---|---|---|
| `onnx` | `model.onnx` | onnxruntime (PyTorch's dynamo exporter) |
| `pt2` | `model.pt2` | AOTInductor: `torch._inductor.aoti_load_package`, or LibTorch in C++ |
| `int8` | `model_int8.pt2` | the same, int8 kernels (`vitblocks.deploy.int8`) |

Each is exported in eval mode with a dynamic batch (1 to 1024) or a fixed one. The `.pt2`
packages are compiled by Inductor with weight freezing (the weights become constants it
folds into its kernels: faster in float32 too) for the CPU of the machine that builds
them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from vitblocks.deploy.errors import DeployError
from vitblocks.deploy.int8 import check_int8_available, quantize_int8
from vitblocks.io import replacing
from vitblocks.layers.early_exit import EarlyExit
from vitblocks.train.process.logs import quieted

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2", "int8": "model_int8.pt2"}
"""Each format's artifact file name."""

MAX_BATCH = 1024
"""The largest batch an artifact with a dynamic batch takes."""

COMPILE_OPTIONS = {"freezing": True, "aot_inductor.check_lowerbound": False}
"""Inductor's options for the `.pt2` packages: weight freezing, and batch 1 allowed under input checks."""

Logits = Callable[[torch.Tensor], torch.Tensor]
"""A loaded artifact: a batch of preprocessed images in, logits out (CPU tensors)."""

OTHER_FORMAT = {"onnx": "pt2", "pt2": "onnx", "int8": "pt2"}


def check_format(fmt: str) -> None:
    """Refuse a format that is not one of `FORMATS`.

    Args:
        fmt: The format asked for.

    Raises:
        DeployError: Naming the formats there are.
    """
    if fmt not in FORMATS:
        raise DeployError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def check_exportable(model: nn.Module, fmt: str) -> None:
    """Refuse, before anything is traced, a format or model that cannot be exported.

    Args:
        model: The model.
        fmt: One of `FORMATS`.

    Raises:
        DeployError: For an unknown format, int8 without torchao or off x86, or a model
            whose early exits stop images (its batch shrinks by the data).
    """
    check_format(fmt)
    exits = [m for m in model.modules() if isinstance(m, EarlyExit) and m.threshold <= 1]
    if exits:
        raise DeployError(f"the model stops confident images early (exit threshold {exits[0].threshold}): the batch "
                          "shrinks with the data, which a traced graph cannot hold. Export the full-depth model "
                          "with --exit-threshold 2, or run early exit eager (vitblocks.predict RUN)")
    if fmt == "int8":
        check_int8_available()


def export_model(model: nn.Module, fmt: str, path: str | os.PathLike, example: torch.Tensor, dynamic: bool,
                 calibration: Iterable[torch.Tensor] = ()) -> Path:
    """Export a model to one format.

    Args:
        model: The model in eval mode, on the CPU.
        fmt: One of `FORMATS`.
        path: The artifact to write (replaced whole, or left as it was on failure).
        example: An input batch of the exported shape.
        dynamic: A dynamic batch (1 to `MAX_BATCH`) instead of the example's.
        calibration: Batches of real images (int8 only).

    Returns:
        The artifact's path.

    Raises:
        DeployError: If the model cannot be exported in this format (naming why and the
            format to try instead).
    """
    check_exportable(model, fmt)
    path = Path(path)
    shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() or not os.access(path.parent, os.W_OK):
            raise PermissionError(f"{path.parent} cannot be written" if not path.is_dir() else f"{path} is a folder")
    except OSError as error:
        raise DeployError(f"the {fmt} artifact cannot be written to {path}: {error.strerror or error}. Give an "
                          "--output folder that can be written") from None
    try:
        with torch.no_grad(), warnings.catch_warnings(), replacing(path) as tmp:
            warnings.simplefilter("ignore")  # exporters' notes on their own internals
            if fmt == "onnx":
                # one file: external weights would keep the temporary file's name
                torch.onnx.export(model, (example,), tmp, dynamo=True, verbose=False, dynamic_shapes=shapes,
                                  external_data=False)
            else:
                from torch._inductor import aoti_compile_and_package

                program = (quantize_int8(model, example, shapes, calibration) if fmt == "int8"
                           else torch.export.export(model, (example,), dynamic_shapes=shapes))
                package = Path(tmp + ".pt2")  # the packager wants the suffix
                try:
                    aoti_compile_and_package(program, package_path=str(package), inductor_configs=COMPILE_OPTIONS)
                    os.replace(package, tmp)
                finally:
                    package.unlink(missing_ok=True)
    except DeployError:
        raise
    except Exception as error:  # noqa: BLE001 - exporters raise many types; the message names the cause
        first = " ".join(str(error).split())[:300]
        raise DeployError(f"{type(model).__name__} cannot be exported as {fmt}: {type(error).__name__}: {first}. "
                          f"Try --format {OTHER_FORMAT[fmt]}") from None
    readable_by_others(path)
    return path


def readable_by_others(path: Path) -> None:
    """Give a written file the permissions a plain `open` would (the umask's), not a temporary file's 0600.

    Args:
        path: The file.
    """
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def load_artifact(path: str | os.PathLike, fmt: str, batch: int | None = None) -> Logits:
    """Load an artifact as a function from a batch of images to logits.

    Args:
        path: The artifact.
        fmt: Its format.
        batch: Its fixed batch size (None: dynamic). Inputs of another size are cut into
            batches of it, the last one padded.

    Returns:
        The function (CPU tensors in and out).

    Raises:
        DeployError: If the file cannot be loaded (onnxruntime missing, another format).
    """
    run = _load(str(path), fmt)
    return run if batch is None else _in_fixed_batches(run, batch)


def _in_fixed_batches(run: Logits, batch: int) -> Logits:
    def fixed(images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in images.split(batch):
            padding = batch - len(chunk)
            if padding:
                chunk = torch.cat([chunk, chunk[-1:].expand(padding, *chunk.shape[1:])])
            outputs.append(run(chunk)[:batch - padding])
        return torch.cat(outputs)

    return fixed


def _load(path: str, fmt: str) -> Logits:
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise DeployError("running ONNX needs onnxruntime: pip install 'vitblocks[export]'") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        # idle workers would spin for a while after each call, taking the cores from whatever runs next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime's own error types
            raise DeployError(f"{path} cannot be loaded by onnxruntime: {' '.join(str(error).split())[:200]}") from None
        name = session.get_inputs()[0].name
        return lambda images: torch.from_numpy(session.run(None, {name: images.contiguous().numpy()})[0])
    try:
        # torch's C++-extension module logs that it found no CUDA runtime when a CPU package loads
        with quieted("torch.utils.cpp_extension"):
            from torch._inductor import aoti_load_package

            package = aoti_load_package(path)
    except Exception as error:  # noqa: BLE001 - the loader's own error types
        raise DeployError(f"{path} cannot be loaded as an AOTInductor package: "
                          f"{' '.join(str(error).split())[:200]}") from None

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return package(images.contiguous())

    return run
