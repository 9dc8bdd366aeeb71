"""Relaxed recursion: each loop of a shared block gets its own small correction.

Bae et al., "Relaxed Recursive Transformers" (ICLR 2025): a block shared across loops
keeps one set of weights, and each loop adds its own low-rank (LoRA) update to the
chosen linears, so sharing costs little accuracy for few parameters. MiniViT keeps the
LayerNorms unshared per layer; here that is `norms=True`.

Every relaxed parameter is *shared value + per-loop delta*, and every delta starts at
zero, so relaxing a block does not change what it computes until the deltas train (or
a conversion sets them; see `vitblocks.models.convert`). The shared weights keep their
names (`attn.qkv.weight`), so weights of the unrelaxed block load unchanged.

    block = RelaxedBlock(TransformerBlock(dim=192, num_heads=3), loops=2, rank=8)
    stage = Recursive(block, loops=2)
    relax_recursion(model, rank=8)       # every Recursive / SharedSequence of a model
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from torch import nn

from vitblocks.layers.loop import check_loop_count, is_loop_aware, mask_kwargs
from vitblocks.layers.scripting import NotScriptable
from vitblocks.layers.shared_stack import SharedStack

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")
"""Linears relaxed by default: attention input/output and MLP projections (timm's names)."""


class LoopLoRALinear(nn.Linear):
    """A shared `nn.Linear` plus a per-loop low-rank update and bias offset.

    Loop `l` computes `x W^T + b + delta_b[l] + (x A[l]^T) B[l]^T` with `A[l]` of shape
    (rank, in) and `B[l]` of shape (out, rank). `B` starts at zero (and so does
    `delta_b`), so the layer starts equal to the shared linear. Which loop runs is set
    by the enclosing `RelaxedBlock` (`active_loop`); loops beyond `loops` use the last.

    Args:
        linear: The shared layer; its `weight` and `bias` are reused, not copied.
        loops: Loops with their own update.
        rank: LoRA rank, 0 <= rank <= min(in, out).
        bias_offsets: Give each loop its own bias offset (needs a bias).
    """

    def __init__(self, linear: nn.Linear, loops: int, rank: int, bias_offsets: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.loops, self.rank = check_loop_count(loops), rank
        self.active_loop = 0
        dd = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_down = self.lora_up = self.bias_delta = None
        if rank:
            self.lora_down = nn.Parameter(torch.empty(loops, rank, self.in_features, **dd))
            self.lora_up = nn.Parameter(torch.zeros(loops, self.out_features, rank, **dd))
            bound = 1 / math.sqrt(self.in_features)  # nn.Linear's default range, as in LoRA
            nn.init.uniform_(self.lora_down, -bound, bound)
        if bias_offsets and linear.bias is not None:
            self.bias_delta = nn.Parameter(torch.zeros(loops, self.out_features, **dd))

    offsets = ("bias_delta",)
    """Per-loop offsets of parameters that optimizers exempt from weight decay (see `per_loop_offsets`)."""

    def _loop_bias(self, loop: int) -> torch.Tensor | None:
        return self.bias if self.bias_delta is None else self.bias + self.bias_delta[loop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the shared linear and the active loop's update."""
        loop = min(self.active_loop, self.loops - 1)
        y = F.linear(x, self.weight, self._loop_bias(loop))
        if self.lora_down is None:
            return y
        return y + F.linear(F.linear(x, self.lora_down[loop]), self.lora_up[loop])

    def loop_weight(self, loop: int) -> torch.Tensor:
        """The dense weight one loop applies.

        Args:
            loop: The loop.

        Returns:
            The shared weight plus the loop's low-rank update, (out, in).
        """
        weight = self.weight
        if self.lora_down is not None:
            weight = weight + self.lora_up[loop] @ self.lora_down[loop]
        return weight

    def loop_parameters(self, loop: int) -> dict[str, torch.Tensor]:
        """The effective parameters of one loop.

        Args:
            loop: The loop.

        Returns:
            `weight` and (with a bias) `bias`, as the loop applies them.
        """
        params = {"weight": self.loop_weight(loop)}
        if self.bias is not None:
            params["bias"] = self._loop_bias(loop)
        return params

    @torch.no_grad()
    def fit_loop(self, loop: int, target: dict[str, torch.Tensor]) -> None:
        """Set one loop's corrections so that it applies `target` as closely as they can.

        The low-rank update becomes the truncated SVD (rank `rank`, in float64) of the
        difference between the target weight and the shared one; the bias offset, the
        exact difference. At full rank `loop_parameters(loop)` then equals the target.

        Args:
            loop: The loop.
            target: `weight` and `bias` to reproduce (missing ones are left alone).
        """
        if self.lora_down is not None and "weight" in target:
            u, s, vh = torch.linalg.svd(target["weight"].double() - self.weight.double(), full_matrices=False)
            self.lora_up[loop].copy_(u[:, : self.rank] * s[: self.rank])
            self.lora_down[loop].copy_(vh[: self.rank])
        if self.bias_delta is not None and "bias" in target:
            self.bias_delta[loop].copy_(target["bias"] - self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loops={self.loops}, rank={self.rank}, bias_offsets={self.bias_delta is not None}"


class LoopLayerNorm(nn.LayerNorm):
    """A shared `nn.LayerNorm` whose affine parameters get a per-loop offset (zero at start).

    Args:
        norm: The shared norm; its parameters are reused.
        loops: Loops with their own offsets.
    """

    def __init__(self, norm: nn.LayerNorm, loops: int) -> None:
        nn.Module.__init__(self)
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.elementwise_affine = norm.elementwise_affine
        self.weight, self.bias = norm.weight, norm.bias
        self.loops, self.active_loop = check_loop_count(loops), 0
        self.weight_delta = self.bias_delta = None
        if norm.weight is not None:
            self.weight_delta = nn.Parameter(torch.zeros(loops, *norm.weight.shape, dtype=norm.weight.dtype,
                                                         device=norm.weight.device))
        if norm.bias is not None:
            self.bias_delta = nn.Parameter(torch.zeros(loops, *norm.bias.shape, dtype=norm.bias.dtype,
                                                       device=norm.bias.device))

    offsets = ("weight_delta", "bias_delta")
    """Per-loop offsets of parameters that optimizers exempt from weight decay (see `per_loop_offsets`)."""

    def _affine(self, loop: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        weight = None if self.weight is None else self.weight + self.weight_delta[loop]
        bias = None if self.bias is None else self.bias + self.bias_delta[loop]
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize with the active loop's affine parameters."""
        weight, bias = self._affine(min(self.active_loop, self.loops - 1))
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)

    def loop_parameters(self, loop: int) -> dict[str, torch.Tensor]:
        """The effective affine parameters of one loop.

        Args:
            loop: The loop.

        Returns:
            `weight` and `bias` (those the norm has), as the loop applies them.
        """
        weight, bias = self._affine(loop)
        return {name: value for name, value in (("weight", weight), ("bias", bias)) if value is not None}

    @torch.no_grad()
    def fit_loop(self, loop: int, target: dict[str, torch.Tensor]) -> None:
        """Set one loop's offsets so that it applies `target` exactly.

        Args:
            loop: The loop.
            target: `weight` and `bias` to reproduce (missing ones are left alone).
        """
        for name, delta in (("weight", self.weight_delta), ("bias", self.bias_delta)):
            if delta is not None and name in target:
                delta[loop].copy_(target[name] - getattr(self, name))


class LoopLayerScale(nn.Module):
    """timm's `LayerScale` with a per-loop offset of its scale (zero at start).

    Args:
        scale: The shared `timm.layers.LayerScale`; its `gamma` is reused.
        loops: Loops with their own offsets.
    """

    def __init__(self, scale: LayerScale, loops: int) -> None:
        super().__init__()
        self.gamma = scale.gamma
        self.loops, self.active_loop = check_loop_count(loops), 0
        self.gamma_delta = nn.Parameter(torch.zeros(loops, *scale.gamma.shape, dtype=scale.gamma.dtype,
                                                    device=scale.gamma.device))

    offsets = ("gamma_delta",)
    """Per-loop offsets of parameters that optimizers exempt from weight decay (see `per_loop_offsets`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale by the active loop's gamma."""
        return x * self.loop_parameters(min(self.active_loop, self.loops - 1))["gamma"]

    def loop_parameters(self, loop: int) -> dict[str, torch.Tensor]:
        """The effective scale of one loop.

        Args:
            loop: The loop.

        Returns:
            `gamma`, as the loop applies it.
        """
        return {"gamma": self.gamma + self.gamma_delta[loop]}

    @torch.no_grad()
    def fit_loop(self, loop: int, target: dict[str, torch.Tensor]) -> None:
        """Set one loop's offset so that it applies `target` exactly.

        Args:
            loop: The loop.
            target: `gamma` to reproduce (left alone when missing).
        """
        if "gamma" in target:
            self.gamma_delta[loop].copy_(target["gamma"] - self.gamma)


PER_LOOP_MODULES = (LoopLoRALinear, LoopLayerNorm, LoopLayerScale)
"""Modules whose parameters differ per loop; each has `active_loop`, `loop_parameters(loop)`,
its inverse `fit_loop(loop, target)`, and the names of its decay-exempt `offsets`."""


def _full_rank(linear: nn.Linear) -> int:
    return min(linear.in_features, linear.out_features)


class RelaxedBlock(NotScriptable, nn.Module):
    """A shared block whose chosen linears (and optionally norms, LayerScale) vary per loop.

    Wraps any block given to `Recursive` or `SharedSequence`: the wrapper takes the loop
    index, selects that loop's corrections inside the block, and calls the block (passing
    the loop on when the block takes one). The block's own parameters keep their names
    under `shared.`; the per-loop ones are added beside them (`lora_down`, `lora_up`,
    `bias_delta`, `weight_delta`, `gamma_delta`).

    With `rank=0` and no other option nothing inside the block changes (the wrapper
    computes exactly what the block does). Loops beyond `loops` (test-time depth) reuse
    the last loop's corrections.

    Args:
        block: The shared block; relaxed in place.
        loops: Loops with their own corrections (the block's uses).
        rank: LoRA rank of every targeted linear, or "full" for min(in, out) of each
            (with which a converted model reproduces its base exactly).
        targets: Names of the linears to relax (the last part of their module path,
            e.g. "qkv" matches `attn.qkv`).
        norms: Per-loop LayerNorm offsets (MiniViT-style unshared norms).
        biases: Per-loop bias offsets of the targeted linears.
        layer_scale: Per-loop offsets of timm `LayerScale` gammas.

    Raises:
        ValueError: If `rank` is negative or above a targeted linear's full rank, or a
            relaxation is asked that finds nothing to relax in the block.

    Example:
        >>> import torch
        >>> from vitblocks.layers import Recursive, RelaxedBlock, TransformerBlock
        >>> stage = Recursive(RelaxedBlock(TransformerBlock(dim=64, num_heads=2), loops=2, rank=4), loops=2)
        >>> stage(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
    """

    loop_aware = True

    def __init__(
        self,
        block: nn.Module,
        loops: int,
        rank: int | str = 0,
        targets: Sequence[str] = DEFAULT_TARGETS,
        norms: bool = False,
        biases: bool = False,
        layer_scale: bool = False,
    ) -> None:
        super().__init__()
        self.loops = check_loop_count(loops)
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        replacements = _relaxation_of(block, rank, targets, norms, biases, layer_scale)  # checks all first
        self.rank, self.targets = rank, targets
        self.options = {"norms": norms, "biases": biases, "layer_scale": layer_scale}
        for name, per_loop in replacements:
            _replace(block, name, per_loop(loops))
        self.shared = block
        self._takes_loop = is_loop_aware(block)
        # found once, not on every application (a plain list: the modules are registered under `shared`)
        self._per_loop = [m for m in block.modules() if isinstance(m, PER_LOOP_MODULES)]

    def select_loop(self, loop: int) -> None:
        """Make every per-loop module of the block use one loop's corrections.

        Args:
            loop: The loop (later loops than trained use the last one's).
        """
        for module in self._per_loop:
            module.active_loop = loop

    def forward(
        self, x: torch.Tensor, loop: int = 0, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Apply the block with loop `loop`'s corrections.

        Args:
            x: The block's input.
            loop: Loop index.
            attn_mask: timm's attention mask, for blocks that take one.
            is_causal: timm's causal flag, likewise.

        Returns:
            The block's output.

        Raises:
            TypeError: If a mask is given to a block that takes none.
        """
        # Selecting the loop is a side effect; under torch.fx the wrapped call below is only
        # recorded (it reselects at run time, before layers that FX records as one call,
        # such as sliced attention), so the loop is also selected here for traced-through code.
        self.select_loop(loop)
        x = select_loop_of(self, x, loop)
        kwargs = mask_kwargs(attn_mask, is_causal, [self.shared])
        return self.shared(x, **({"loop": loop} if self._takes_loop else {}), **kwargs)

    def extra_repr(self) -> str:
        options = ", ".join(k for k, v in self.options.items() if v)
        return f"loops={self.loops}, rank={self.rank}, targets={self.targets}" + (f", {options}" if options else "")


def per_loop_offsets(model: nn.Module) -> set[str]:
    """Names of a model's per-loop bias, norm and LayerScale offsets.

    Optimizers should exempt them from weight decay, as timm exempts the biases and norm
    parameters they offset (LoRA matrices are decayed like other weights).

    Args:
        model: Any module.

    Returns:
        Parameter names as `model.named_parameters()` gives them.
    """
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if isinstance(module, PER_LOOP_MODULES)
            for name in module.offsets if getattr(module, name) is not None}


def select_loop_of(block: RelaxedBlock, x: torch.Tensor, loop: int) -> torch.Tensor:
    """Select a relaxed block's loop and pass `x` through: one node of an FX graph, run in order.

    Args:
        block: The relaxed block.
        x: Its input, returned unchanged.
        loop: The loop to select.

    Returns:
        `x`.
    """
    block.select_loop(loop)
    return x


torch.fx.wrap("select_loop_of")


RELAX_OPTIONS = ("rank", "targets", "norms", "biases", "layer_scale")
"""The options of a relaxation (`RelaxedBlock`, `relax_recursion`, `make_recursive(relax=...)`)."""


def check_relaxation(block: nn.Module, options: dict[str, Any]) -> None:
    """Check relaxation options against a block without changing it.

    Args:
        block: A block of the kind that will be relaxed.
        options: `RelaxedBlock` options (`rank`, `targets`, `norms`, `biases`, `layer_scale`).

    Raises:
        ValueError: For an unknown option, a bad rank (negative, or above a targeted
            linear's full rank) or a relaxation that finds nothing to relax.
    """
    unknown = sorted(set(options) - set(RELAX_OPTIONS))
    if unknown:
        raise ValueError(f"relax: unknown option(s) {unknown}; the options are {RELAX_OPTIONS}")
    targets = options.get("targets", DEFAULT_TARGETS)
    _relaxation_of(block, options.get("rank", 0), (targets,) if isinstance(targets, str) else tuple(targets),
                   options.get("norms", False), options.get("biases", False), options.get("layer_scale", False))


def _relaxation_of(block: nn.Module, rank: int | str, targets: tuple[str, ...], norms: bool, biases: bool,
                   layer_scale: bool) -> list[tuple[str, Callable[[int], nn.Module]]]:
    """The modules a relaxation replaces, each with a factory of its per-loop version (given loops).

    Everything is checked before anything is replaced, so a refused relaxation leaves the
    block as it was.
    """
    if isinstance(block, RelaxedBlock):
        raise ValueError("this block is already relaxed")
    if rank != "full" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise ValueError(f"rank must be an int >= 0 or 'full', got {rank!r}")
    modules = list(block.named_modules())
    linears = [(name, m) for name, m in modules
               if isinstance(m, nn.Linear) and not isinstance(m, LoopLoRALinear) and name.split(".")[-1] in targets]
    if (rank or biases) and not linears:
        found = sorted({name.split(".")[-1] for name, m in modules if isinstance(m, nn.Linear)})
        raise ValueError(f"no linear of {type(block).__name__} is named one of {targets}; its linears are {found}")
    replacements: list[tuple[str, Callable[[int], nn.Module]]] = []
    for name, linear in linears if rank or biases else ():
        full = _full_rank(linear)
        layer_rank = full if rank == "full" else rank
        if layer_rank > full:
            raise ValueError(f"rank {rank} is above the full rank of {name} ({linear.out_features}x"
                             f"{linear.in_features}: at most {full}); use a rank <= {full} or 'full'")
        replacements.append((name, partial(_lora_of, linear, layer_rank, biases)))
    if norms:
        found = [(name, m) for name, m in modules if isinstance(m, nn.LayerNorm) and not isinstance(m, LoopLayerNorm)]
        if not found:
            raise ValueError(f"norms=True: {type(block).__name__} has no nn.LayerNorm")
        replacements += [(name, partial(_norm_of, norm)) for name, norm in found]
    if layer_scale:
        found = [(name, m) for name, m in modules if isinstance(m, LayerScale)]
        if not found:
            raise ValueError(f"layer_scale=True: {type(block).__name__} has no timm LayerScale")
        replacements += [(name, partial(_scale_of, scale)) for name, scale in found]
    return replacements


def _lora_of(linear: nn.Linear, rank: int, biases: bool, loops: int) -> LoopLoRALinear:
    return LoopLoRALinear(linear, loops, rank, bias_offsets=biases)


def _norm_of(norm: nn.LayerNorm, loops: int) -> LoopLayerNorm:
    return LoopLayerNorm(norm, loops)


def _scale_of(scale: LayerScale, loops: int) -> LoopLayerScale:
    return LoopLayerScale(scale, loops)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root.get_submodule(path.rsplit(".", 1)[0]) if "." in path else root
    setattr(parent, path.rsplit(".", 1)[-1], module)


def relax_recursion(
    model: nn.Module,
    rank: int | str = 0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    norms: bool = False,
    biases: bool = False,
    layer_scale: bool = False,
) -> int:
    """Relax every shared block of a model: wrap it in a `RelaxedBlock`, in place.

    Finds each `Recursive` (its block gets `loops` corrections) and `SharedSequence`
    (each unique block gets one per use) — SReT's stages, `make_recursive`'s stacks, or
    your own. Blocks used once (nothing shared) and blocks already relaxed are left as
    they are.

    Args:
        model: Any module holding `Recursive` or `SharedSequence` layers.
        rank: LoRA rank (int or "full"), as in `RelaxedBlock`.
        targets: Linear names to relax.
        norms: Per-loop LayerNorm offsets.
        biases: Per-loop bias offsets of the targeted linears.
        layer_scale: Per-loop LayerScale offsets.

    Returns:
        The number of blocks relaxed.

    Raises:
        ValueError: If the model has no shared block, or from `RelaxedBlock`.

    Example:
        >>> import timm, vitblocks
        >>> from vitblocks.layers import relax_recursion
        >>> model = timm.create_model("sret_t", img_size=64)
        >>> relax_recursion(model, rank=4)
        10
    """
    options = {"rank": rank, "targets": targets, "norms": norms, "biases": biases, "layer_scale": layer_scale}
    stacks = [m for m in model.modules() if isinstance(m, SharedStack)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no Recursive or SharedSequence layer to relax; "
                         "share its blocks first (vitblocks.models.make_recursive)")
    relaxed = 0
    for stack in stacks:
        for index, (block, uses) in enumerate(zip(stack.unique_blocks(), stack.block_uses)):
            if uses > 1 and not isinstance(block, RelaxedBlock):
                stack.set_unique_block(index, RelaxedBlock(block, uses, **options))
                relaxed += 1
    return relaxed
