"""A pre-norm transformer block that knows which loop it is on."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import Mlp
from torch import nn

from vitblocks.layers.drop import DropPath, keep_mask
from vitblocks.layers.loop import is_loop_aware
from vitblocks.layers.loop_plan import LoopPlan
from vitblocks.layers.residual import scaled_residual
from vitblocks.layers.scalar import learnable_scalar
from vitblocks.layers.scripting import NotScriptable
from vitblocks.layers.sliced import SlicedGroupAttention

torch.fx.wrap("scaled_residual")  # torch.fx records it as one call: it branches on whether gradients are needed


class TransformerBlock(NotScriptable, nn.Module):
    """Pre-norm transformer block with optional learnable residual scalars.

    Without residual scalars:

        u   = x + DropPath(Attn(LN1(x)))
        out = u + DropPath(MLP(LN2(u)))

    With `residual_scalars=True` (SReT's block) each of the four terms gets its own
    learnable scalar, initialised to 1:

        u   = a1*x + a2*DropPath(Attn(LN1(x)))
        out = a3*u + a4*DropPath(MLP(LN2(u)))

    The block is loop-aware: the loop index given to `forward` is passed on to the
    attention layer when that is loop-aware too, so a block wrapped in `Recursive` can
    slice differently per loop.

    Args:
        dim: Token channels.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width as a multiple of `dim` (hidden = int(dim * ratio)).
        qkv_bias: Bias on the qkv projection.
        proj_drop: Dropout after the attention projection and in the MLP.
        attn_drop: Dropout on attention weights.
        drop_path: Stochastic-depth rate of both residual branches.
        residual_scalars: Add the four learnable residual scalars.
        attn_layer: Attention class, called as
            `attn_layer(dim, num_heads=..., qkv_bias=..., attn_drop=..., proj_drop=..., **attn_kwargs)`.
        norm_layer: Norm class, called as `norm_layer(dim)`.
        act_layer: Activation class of the MLP.
        mlp_layer: MLP class, called as `mlp_layer(in_features, hidden_features, act_layer=..., drop=...)`.
        device: Where the parameters live (passed to every part when set).
        dtype: Dtype of the parameters (passed to every part when set).
        **attn_kwargs: Further arguments for `attn_layer`, e.g. `groups=(8, 2)`,
            `backend="math"`.

    Examples:
        >>> import torch
        >>> block = TransformerBlock(dim=192, num_heads=3, groups=(8, 2))
        >>> block(torch.randn(2, 64, 192), loop=1).shape
        torch.Size([2, 64, 192])
    """

    loop_aware = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        residual_scalars: bool = False,
        attn_layer: type[nn.Module] = SlicedGroupAttention,
        norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: type[nn.Module] = nn.GELU,
        mlp_layer: type[nn.Module] = Mlp,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **attn_kwargs: Any,
    ) -> None:
        super().__init__()
        # only passed when set, so attention and MLP classes without these arguments still work
        dd = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
        self.dim = dim
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn_layer(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **attn_kwargs, **dd
        )
        self.drop_path1 = DropPath(drop_path, device=device) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path, device=device) if drop_path > 0 else nn.Identity()
        self.residual_scalars = residual_scalars
        if residual_scalars:
            self.skip_scale1 = learnable_scalar(**dd)
            self.branch_scale1 = learnable_scalar(**dd)
            self.skip_scale2 = learnable_scalar(**dd)
            self.branch_scale2 = learnable_scalar(**dd)
        self._attn_aware = is_loop_aware(self.attn)
        self._attn_plans = callable(getattr(self.attn, "loop_plan", None))

    def loop_plan(self, x: torch.Tensor, loop: int) -> Any:
        """What the attention layer does differently on one loop, computed ahead.

        Args:
            x: The block's input tokens (B, P + N, C).
            loop: Loop index.

        Returns:
            The attention layer's plan (see `SlicedGroupAttention.loop_plan`), or None if
            the layer makes none.
        """
        if not self._attn_plans:
            return None
        num_tokens = x.shape[1] - getattr(self.attn, "num_prefix_tokens", 0)
        return self.attn.loop_plan(num_tokens, loop, x.device)

    def draw_drop_masks(self, x: torch.Tensor, loops: int) -> torch.Tensor | None:
        """Stochastic-depth factors of `loops` applications, drawn at once.

        `Recursive` calls it once per forward pass and hands each application its
        slice (`forward(..., drop_masks=...)`), so a block applied `loops` times draws
        its masks in one operator instead of one per application.

        Args:
            x: The block's input (for batch size, rank and dtype).
            loops: Applications to draw for.

        Returns:
            (loops, 2, B, 1, ..., 1) factors (0 or 1 / keep) in the dtype of `x`, or None
            in eval mode or when the two branches' rates differ or are zero.
        """
        drop1, drop2 = self.drop_path1, self.drop_path2
        if not (self.training and self.residual_scalars and isinstance(drop1, DropPath) and isinstance(drop2, DropPath)
                and drop1.drop_prob == drop2.drop_prob):
            return None
        return keep_mask(x, drop1.keep_prob, draws=2 * loops).to(x.dtype).unflatten(0, (loops, 2))

    def forward(
        self, x: torch.Tensor, loop: int = 0, plan: LoopPlan | None = None, drop_masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Apply the block once.

        Args:
            x: Tokens of shape (B, N, C).
            loop: Index of this application of the block's weights.
            plan: The loop's plan from `loop_plan`, if computed beforehand; `loop` is then
                not used.
            drop_masks: This application's (2, B, 1, ..., 1) stochastic-depth factors,
                if drawn beforehand (`draw_drop_masks`); otherwise the block draws them.

        Returns:
            Tensor of shape (B, N, C).
        """
        if not (isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_tokens(x, self.dim, type(self).__name__)
        normed = self.norm1(x)
        if plan is not None:
            attn = self.attn(normed, plan=plan)
        elif self._attn_aware:
            attn = self.attn(normed, loop=loop)
        else:
            attn = self.attn(normed)
        if not self.residual_scalars:
            x = x + self.drop_path1(attn)
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        # one fused sum per residual, stochastic depth folded into the branch gate
        mask1, mask2 = self._drop_masks(attn) if drop_masks is None else (drop_masks[0], drop_masks[1])
        x = scaled_residual(x, self.skip_scale1, attn, self.branch_scale1, mask1)
        mlp = self.mlp(self.norm2(x))
        return scaled_residual(x, self.skip_scale2, mlp, self.branch_scale2, mask2)

    def _drop_masks(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Both branches' stochastic-depth factors (None where there is none), drawn at once when they
        share a rate."""
        masks = self.draw_drop_masks(x, loops=1)
        if masks is not None:
            return masks[0, 0], masks[0, 1]
        return tuple(d.gate(x) if isinstance(d, DropPath) else None for d in (self.drop_path1, self.drop_path2))


def check_tokens(x: torch.Tensor, dim: int, layer: str) -> None:
    """Refuse tokens that are not (batch, tokens, dim), naming the fix.

    Args:
        x: The input.
        dim: The width the layer was built for.
        layer: The layer's name, for the message.

    Raises:
        ValueError: For another number of dimensions or another width.

    Examples:
        >>> check_tokens(torch.zeros(2, 49, 192), 192, "TransformerBlock")
        >>> check_tokens(torch.zeros(2, 192, 7, 7), 192, "TransformerBlock")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: TransformerBlock takes tokens of shape (batch, tokens, 192), got (2, 192, 7, 7): flatten...
    """
    if x.dim() != 3:
        hint = ": flatten a feature map first, x.flatten(2).transpose(1, 2)" if x.dim() == 4 else ""
        raise ValueError(f"{layer} takes tokens of shape (batch, tokens, {dim}), got {tuple(x.shape)}{hint}")
    if x.shape[-1] != dim:
        raise ValueError(f"{layer} was built with dim={dim} but got tokens of width {x.shape[-1]} "
                         f"(shape {tuple(x.shape)}): build it with dim={x.shape[-1]}, or project the tokens to {dim}")
