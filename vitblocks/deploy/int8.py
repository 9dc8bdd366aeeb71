"""Static int8 for x86 CPUs: torchao's PT2E quantizer, calibrated on real images, lowered by Inductor.

The exported graph gets observers at the inputs and weights of its linear layers and
convolutions (`X86InductorQuantizer`, per-channel symmetric weights, per-tensor
activations); running calibration images through it records each activation's range;
`convert_pt2e` replaces the observers with quantize / dequantize pairs. Inductor, with
weight freezing on, then folds those pairs into oneDNN's int8 kernels (VNNI / AMX where
the CPU has them). Without freezing the pairs stay and the model is slower than float.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from vitblocks.deploy.errors import DeployError
from vitblocks.train.process.logs import quieted

X86 = ("x86_64", "amd64", "i386", "i686")


def check_int8_available() -> None:
    """Refuse int8 where it cannot be built: another CPU than x86, or no torchao.

    Raises:
        DeployError: Naming what is missing and the format that works.
    """
    machine = platform.machine().lower()
    if machine not in X86:
        raise DeployError(f"int8 targets x86 CPUs (torchao's X86InductorQuantizer); this machine is {machine}: "
                          "export --format pt2 or onnx here")
    try:
        _quantization_api()
    except ImportError as error:
        raise DeployError(f"int8 needs torchao ({error}): pip install 'vitblocks[export]', or export --format pt2 "
                          "or onnx") from None


def _quantization_api() -> tuple[Any, Any, Any]:
    with quieted("torch.utils._pytree"):  # torchao's import logs a deprecation note of torch's pytree
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    return x86, prepare_pt2e, convert_pt2e


def quantize_int8(model: nn.Module, example: torch.Tensor, dynamic_shapes: Any,
                  calibration: Iterable[torch.Tensor]) -> torch.export.ExportedProgram:
    """Quantize a float model to static int8 and export the result.

    Args:
        model: The model in eval mode.
        example: An input of the exported shape.
        dynamic_shapes: `torch.export`'s dynamic shapes for `example` (None: static).
        calibration: Batches of real, preprocessed images whose activation ranges set the
            quantization scales.

    Returns:
        The exported int8 program, for `aoti_compile_and_package` with freezing on.

    Raises:
        DeployError: If no calibration batch is given, or int8 is not available here.
    """
    check_int8_available()
    x86, prepare_pt2e, convert_pt2e = _quantization_api()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        graph = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes).module()
        prepared = prepare_pt2e(graph, quantizer)
        seen = 0
        for batch in calibration if dynamic_shapes is not None else in_batches_of(calibration, len(example)):
            prepared(batch)
            seen += len(batch)
        if not seen:
            raise DeployError("int8 calibration got no images: give --calibration-images N > 0 or a --calibration "
                              "folder with images")
        converted = convert_pt2e(prepared)
        unshare_quantized_weights(converted)
        return torch.export.export(converted, (example,), dynamic_shapes=dynamic_shapes)


def unshare_quantized_weights(graph: torch.fx.GraphModule) -> int:
    """Give every use of a shared int8 weight its own copy, so Inductor packs each into oneDNN's int8 kernel.

    A recursive block's weights serve every loop; after conversion each use dequantizes
    the same int8 tensor, and Inductor's weight-prepacking pattern takes only a weight with
    one user: the others would fall back to float matrix products on dequantized weights,
    slower than the float model. Copying costs the int8 size of each extra use.

    Args:
        graph: A graph after `convert_pt2e` (changed in place).

    Returns:
        How many copies were made.
    """
    copies = 0
    for node in list(graph.graph.nodes):
        if node.op != "get_attr" or len(node.users) < 2:
            continue
        weight = functools.reduce(getattr, node.target.split("."), graph)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8:
            continue
        for use, user in enumerate(list(node.users)[1:], start=1):
            name = f"{node.target.replace('.', '_')}_use{use}"
            graph.register_buffer(name, weight.clone())
            with graph.graph.inserting_before(user):
                user.replace_input_with(node, graph.graph.get_attr(name))
            copies += 1
    graph.graph.lint()
    graph.recompile()
    return copies


def in_batches_of(batches: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Batches of images re-cut to one size, the last padded by repeating its last image.

    A graph exported with a fixed batch takes only that batch size; padding repeats an
    image already seen, which moves no observed range.

    Args:
        batches: Batches of any sizes.
        size: The batch size to cut to.

    Yields:
        Batches of exactly `size` images.

    Examples:
        >>> tuple(len(b) for b in in_batches_of([torch.zeros(5, 3), torch.zeros(4, 3)], 4))
        (4, 4, 4)
    """
    images = [b for b in batches if len(b)]
    if not images:
        return
    joined = torch.cat(images)
    for chunk in joined.split(size):
        if len(chunk) < size:
            chunk = torch.cat([chunk, chunk[-1:].expand(size - len(chunk), *chunk.shape[1:])])
        yield chunk
