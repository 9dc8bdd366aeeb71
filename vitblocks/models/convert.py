"""Turn a trained unshared timm model into a weight-shared (optionally relaxed) one.

Following "Relaxed Recursive Transformers" (Bae et al., ICLR 2025): the shared blocks
are initialised from the model's own layers, and each use of a shared block gets a
per-loop correction that starts at the truncated SVD of the difference between the
layer it replaces and the shared weights — at full rank the converted model computes
exactly what the original did; lower ranks trade accuracy for parameters, and a short
distillation from the original recovers most of the gap.

    model = timm.create_model("deit_tiny_patch16_224", pretrained=True)
    report = convert_to_recursive(model, share="cycle", loops=2, init="stepwise", rank=8)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitblocks.layers.per_loop import PER_LOOP_MODULES
from vitblocks.layers.relaxation import Relaxation, relaxation_options
from vitblocks.layers.sharing import Sharing
from vitblocks.models.plug import load_base_weights, make_recursive
from vitblocks.models.recursion_plan import RecursionPlan

INITS = ("first", "average", "stepwise")
"""How shared weights are chosen from the layers that use them."""


@dataclass
class ConversionReport:
    """What `convert_to_recursive` did.

    Attributes:
        plan: Where each original block went.
        init: The shared-weight initialisation.
        rank: The LoRA rank.
        parameters_before: Parameters of the unshared model.
        parameters_after: Parameters of the converted model.
        weight_error: ‖W_converted − W_original‖ / ‖W_original‖ over every block
            parameter of every layer position: what the conversion could not represent
            (0 at full rank with per-loop norms and biases).
    """

    plan: RecursionPlan
    init: str
    rank: int | str
    parameters_before: int
    parameters_after: int
    weight_error: float

    def __str__(self) -> str:
        return (f"init={self.init}, rank={self.rank}: {self.parameters_before:,} -> {self.parameters_after:,} "
                f"parameters ({self.parameters_after / self.parameters_before:.1%}), "
                f"weight error {self.weight_error:.3g}")


CONVERSION_RELAXATION = Relaxation(norms=True, biases=True)
"""What a conversion relaxes unless told otherwise: each layer keeps its own norms and biases
(per-loop offsets set to them), so only the shared linears' weights differ from the base."""


def convert_to_recursive(
    model: nn.Module,
    loops: int = 2,
    share: Sharing | Sequence[Sequence[int]] = "cycle",
    init: str = "first",
    relax: Relaxation | dict[str, Any] | None = None,
    mix: str = "none",
    **options: Any,
) -> ConversionReport:
    """Share a trained model's blocks and initialise the shared model from its weights, in place.

    Args:
        model: A trained timm ViT/DeiT, PiT or Swin model.
        loops: Uses of each unique block (see `make_recursive`).
        share: "cycle" (Relaxed Recursive Transformers' looping), "consecutive" (SReT)
            or an explicit assignment.
        init: Shared weights of each unique block: "first" (the first layer that uses
            it), "average" (the mean of every layer that uses it) or "stepwise" (the
            j-th unique block of a stack, counted in order of first use, takes layer
            floor(j * depth / unique): evenly spaced layers). A block used by one layer
            only takes that layer's weights whatever the init.
        relax: The per-loop corrections, each set to reproduce its layer: a
            `Relaxation` or a dict of its options. None: `CONVERSION_RELAXATION` (per-loop
            norms and biases, no LoRA) with the `Relaxation` options among `options`
            applied to it, e.g. `rank=8` or `rank="full"` (exact), `norms=False`.
        mix: Mix layers after each use ("none" keeps the conversion exact).
        **options: `Relaxation` options (`rank`, `targets`, `norms`, `biases`,
            `layer_scale`) when `relax` is None, and further `make_recursive` options
            (`groups`, ...).

    Returns:
        The report (parameter counts, weight error).

    Raises:
        ValueError: For an unknown `init`, and whatever `Relaxation` or
            `make_recursive` refuses (bad assignment, rank above a layer's limit).
        TypeError: If `relax` and `Relaxation` options are both given.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    relax_options = {k: options.pop(k) for k in relaxation_options() if k in options}  # the rest: make_recursive's
    if relax is None:
        relaxation = Relaxation.parse({**CONVERSION_RELAXATION.as_dict(), **relax_options})
    else:
        relaxation = Relaxation.parse(relax, **relax_options)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = sum(p.numel() for p in model.parameters())
    plan = make_recursive(model, loops=loops, share=share, mix=mix,
                          relax=relaxation if relaxation.relaxes else None, **options)
    load_base_weights(model, base, plan)
    with torch.no_grad():
        if init != "first":
            _initialise_shared(model, base, plan, init)
        if relaxation.relaxes:
            _fit_per_loop_corrections(model, base, plan)
        error = _weight_error(model, base, plan)
    after = sum(p.numel() for p in model.parameters())
    return ConversionReport(plan, init, relaxation.rank, before, after, error)


def _block_weights(base: dict[str, torch.Tensor], block: str) -> dict[str, torch.Tensor]:
    return {k[len(block) + 1 :]: v for k, v in base.items() if k.startswith(block + ".")}


def _stacks(plan: RecursionPlan) -> dict[str, list[tuple[int, str, int]]]:
    """Per stack: (block index, shared path, loop) of every original block, in order."""
    stacks: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for original, (path, loop) in plan.applications.items():
        stack, index = original.rsplit(".", 1)
        stacks[stack].append((int(index), path, loop))
    return {stack: sorted(entries) for stack, entries in stacks.items()}


def _initialise_shared(model: nn.Module, base: dict[str, torch.Tensor], plan: RecursionPlan, init: str) -> None:
    state = model.state_dict()
    for stack, entries in _stacks(plan).items():
        unit_size = plan.unit_sizes[stack]
        paths = list(dict.fromkeys(path for _, path, _ in entries))  # shared blocks, in order of first use
        users = {path: [index for index, p, _ in entries if p == path] for path in paths}
        units, shared_units = len(entries) // unit_size, len(paths) // unit_size
        for j, path in enumerate(paths):
            if init == "average" or len(users[path]) == 1:  # a block used once keeps its own layer
                sources = users[path]
            else:  # stepwise: evenly spaced units (the same block of each unit)
                unit, k = divmod(j, unit_size)
                sources = [(unit * units // shared_units) * unit_size + k]
            weights = [_block_weights(base, f"{stack}.{i}") for i in sources]
            for name in weights[0]:
                key = f"{path}.{name}"
                if key in state:
                    state[key].copy_(torch.stack([w[name] for w in weights]).float().mean(0).to(state[key].dtype))


def _per_loop_modules(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.get_submodule(path).named_modules() if isinstance(m, PER_LOOP_MODULES)]


def _fit_per_loop_corrections(model: nn.Module, base: dict[str, torch.Tensor], plan: RecursionPlan) -> None:
    """Set each use's corrections to what separates its original layer from the shared weights."""
    for original, (path, loop) in plan.applications.items():
        weights = _block_weights(base, original)
        for name, module in _per_loop_modules(model, path):
            prefix = f"{name}." if name else ""
            module.fit_loop(loop, {k[len(prefix):]: v for k, v in weights.items()
                                   if k.startswith(prefix) and "." not in k[len(prefix):]})


def effective_block_weights(model: nn.Module, path: str, loop: int) -> dict[str, torch.Tensor]:
    """The parameters one loop of a shared block applies, under the base block's names.

    Args:
        model: A converted (or relaxed) model.
        path: The shared block's path (`RecursionPlan.applications`).
        loop: The loop.

    Returns:
        Parameter name (relative to the block) -> the tensor that loop uses.
    """
    block = model.get_submodule(path)
    weights: dict[str, torch.Tensor] = {}
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, PER_LOOP_MODULES):
            weights.update({prefix + k: v for k, v in module.loop_parameters(loop).items()})
        else:
            weights.update({prefix + k: v for k, v in module.named_parameters(recurse=False)})
    return weights


def _weight_error(model: nn.Module, base: dict[str, torch.Tensor], plan: RecursionPlan) -> float:
    squared_error = squared_norm = 0.0
    for original, (path, loop) in plan.applications.items():
        effective = effective_block_weights(model, path, loop)
        for name, tensor in _block_weights(base, original).items():
            if name in effective:
                squared_error += float((effective[name].double() - tensor.double()).pow(2).sum())
                squared_norm += float(tensor.double().pow(2).sum())
    return (squared_error / squared_norm) ** 0.5 if squared_norm else 0.0
