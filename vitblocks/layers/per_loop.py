"""Per-loop modules: a shared layer's parameters plus one correction per loop.

Each keeps the shared layer's parameters under their own names (`weight`, `bias`,
`gamma`), adds per-loop corrections that start at zero, and applies the correction of
its `active_loop`, which the enclosing `RelaxedBlock` selects. Each can also report the
parameters one loop applies (`loop_parameters`) and set a loop's corrections to
reproduce given ones (`fit_loop`), which `vitblocks.models.convert` uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from torch import nn

from vitblocks.layers.loop import check_loop_count


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
        return (f"{super().extra_repr()}, loops={self.loops}, rank={self.rank}, "
                f"bias_offsets={self.bias_delta is not None}")


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
