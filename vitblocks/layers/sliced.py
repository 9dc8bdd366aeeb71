"""Sliced group self-attention: attention restricted to groups of tokens, per loop."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from vitblocks.attention import TokenGroups, group_attention
from vitblocks.layers.loop_plan import LoopPlan
from vitblocks.layers.modes import PermutationPolicy
from vitblocks.layers.permutation import (
    cached_fixed_permutation,
    check_policy,
    inverse_permutation,
    permute_tokens_with_inverse,
    random_permutation,
)
from vitblocks.layers.schedule import GroupSchedule
from vitblocks.layers.scripting import NotScriptable

_NO_MASK = ("SlicedGroupAttention takes no attn_mask or is_causal: its token groups define the mask; "
            "use timm.layers.Attention for masked attention")


class SlicedGroupAttention(NotScriptable, nn.Module):
    """Multi-head self-attention within groups of tokens, with a group count per loop.

    On loop 0 the patch tokens are cut into contiguous raster-order chunks. On later
    loops with more than one group the patch tokens are first permuted (see
    `permutation` / `eval_permutation`), cut into chunks, and put back in order before
    the output projection, so tokens far apart on the image can meet. Groups differ in
    size by at most one token when the count does not divide evenly.

    Prefix tokens (class / distillation tokens, the first `num_prefix_tokens`) are never
    permuted; they attend to every token and every token attends to them. With
    `groups=1` the layer is standard multi-head attention. Its parameters (`qkv`,
    `q_norm`, `k_norm`, `norm`, `proj`) and constructor arguments match
    `timm.layers.Attention`, so weights load either way and the class can be passed as
    `attn_layer` to timm's ViT blocks.

    Args:
        dim: Token channels C.
        num_heads: Attention heads; must divide `dim`.
        groups: Groups per loop: an int for every loop, or a schedule like `(8, 2)`
            whose last entry repeats for further loops.
        qkv_bias: Bias on the qkv projection.
        qk_norm: Normalize queries and keys per head with `norm_layer`.
        scale_norm: Normalize the attention output before the projection.
        proj_bias: Bias on the output projection.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        norm_layer: Norm class for `qk_norm` and `scale_norm` (default LayerNorm).
        num_prefix_tokens: Tokens at the front excluded from slicing.
        permutation: Policy in training mode: "random" (drawn on the input's device),
            "random_cpu" (drawn on the CPU generator, as the official code), "fixed" or
            "none"; see `vitblocks.layers.permutation`.
        eval_permutation: Policy in eval mode; "fixed" makes inference repeatable.
        seed: Seed of the "fixed" policy (combined with the loop index).
        backend: Attention backend name, or None to follow the global choice.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Raises:
        ValueError: For a `dim` not divisible by `num_heads`, a bad `groups` schedule
            or an unknown policy; at call time, for more groups than patch tokens.

    Examples:
        >>> import torch
        >>> attn = SlicedGroupAttention(dim=64, num_heads=2, groups=(8, 2))
        >>> attn(torch.randn(2, 196, 64), loop=1).shape
        torch.Size([2, 196, 64])
    """

    loop_aware = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        groups: int | Sequence[int] | GroupSchedule = 1,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        num_prefix_tokens: int = 0,
        permutation: str = "random",
        eval_permutation: str = "fixed",
        seed: int = 0,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.schedule = GroupSchedule.parse(groups)
        self.groups = self.schedule.counts
        self.num_prefix_tokens = num_prefix_tokens
        self.permutation = check_policy(permutation, "permutation")
        self.eval_permutation = check_policy(eval_permutation, "eval_permutation")
        self.seed = seed
        self.backend = backend

        factory = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or nn.LayerNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        self.q_norm = norm_layer(self.head_dim, **factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **factory) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.norm = norm_layer(dim, **factory) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    def groups_at(self, loop: int) -> int:
        """Group count of one loop.

        Args:
            loop: Loop index.

        Returns:
            The schedule's entry for the loop; its last entry repeats for later loops.
        """
        return self.schedule.at(loop)

    def permutation_at(self, num_tokens: int, loop: int, device: torch.device | None = None) -> torch.Tensor | None:
        """The patch-token permutation for one call, or None when tokens keep their order.

        Args:
            num_tokens: Number of patch tokens.
            loop: Loop index of the call.
            device: Device of the permutation.

        Returns:
            The permutation of the patch tokens (int64), or None.
        """
        if loop == 0 or self.groups_at(loop) == 1:
            return None
        policy = self._policy()
        if policy in (PermutationPolicy.RANDOM, PermutationPolicy.RANDOM_CPU):
            return random_permutation(num_tokens, device, on_cpu_generator=policy is PermutationPolicy.RANDOM_CPU)
        if policy is PermutationPolicy.FIXED:
            return cached_fixed_permutation(num_tokens, self._fixed_seed(loop), device)
        return None

    def loop_plan(self, num_tokens: int, loop: int, device: torch.device | None = None) -> LoopPlan:
        """Group count and permutations of one call.

        Args:
            num_tokens: Number of patch tokens.
            loop: Loop index of the call.
            device: Device of the permutations.

        Returns:
            The plan; `forward(x, plan=...)` follows it instead of deriving it from `loop`.

        Raises:
            ValueError: If the loop's group count exceeds the patch tokens.
        """
        if not torch.jit.is_tracing():  # a trace records no check
            self.schedule.check_fits(num_tokens, where="patch tokens", loop=loop)
        num_groups = self.groups_at(loop)
        perm = self.permutation_at(num_tokens, loop, device)
        if perm is None:
            return LoopPlan(num_groups)
        if self._policy() is PermutationPolicy.FIXED:  # cached with the permutation itself
            return LoopPlan(num_groups, perm,
                            cached_fixed_permutation(num_tokens, self._fixed_seed(loop), device, inverse=True))
        return LoopPlan(num_groups, perm, inverse_permutation(perm))

    def _policy(self) -> PermutationPolicy:
        return self.permutation if self.training else self.eval_permutation

    def _fixed_seed(self, loop: int) -> int:
        return self.seed * 1_000_003 + loop

    def forward(
        self,
        x: torch.Tensor,
        loop: int = 0,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        plan: LoopPlan | None = None,
    ) -> torch.Tensor:
        """Attend within groups.

        Args:
            x: Tokens of shape (B, P + N, C), prefix tokens first.
            loop: Index of the current application of the shared weights.
            attn_mask: Accepted for timm compatibility; must be None (the groups are
                the mask).
            is_causal: Accepted for timm compatibility; must be False.
            plan: The loop's plan, if computed beforehand (`loop_plan`); `loop` is then
                not used.

        Returns:
            Tensor of shape (B, P + N, C).

        Raises:
            ValueError: If the loop's group count exceeds the patch tokens, or a mask
                or causal attention is requested.
        """
        return sliced_attention_forward(self, x, loop, plan, attn_mask, is_causal)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, groups={self.groups}, num_prefix_tokens={self.num_prefix_tokens}, "
            f"permutation={self.permutation.value!r}, eval_permutation={self.eval_permutation.value!r}"
        )


def sliced_attention_forward(
    attn: SlicedGroupAttention,
    x: torch.Tensor,
    loop: int,
    plan: LoopPlan | None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """One call of a `SlicedGroupAttention` (its `forward` after the argument checks).

    A function of its own so that `torch.fx` records it as one call (`torch.fx.wrap`):
    the token count decides the groups and permutations, which symbolic tracing cannot
    branch on. Traced graphs (and timm's FX feature extraction) hold one node per
    attention layer, run with real shapes.

    Args:
        attn: The layer.
        x: Tokens (B, P + N, C).
        loop: Loop index.
        plan: A precomputed plan, or None.
        attn_mask: Must be None.
        is_causal: Must be False.

    Returns:
        (B, P + N, C).
    """
    if attn_mask is not None or is_causal:
        raise ValueError(_NO_MASK)
    if not torch.jit.is_tracing() and (x.dim() != 3 or x.shape[-1] != attn.qkv.in_features):
        raise ValueError(f"SlicedGroupAttention expects tokens of shape (batch, tokens, {attn.qkv.in_features}), "
                         f"got {tuple(x.shape)}; flatten a (B, C, H, W) map with x.flatten(2).transpose(1, 2)")
    if loop < 0:
        raise ValueError(f"loop={loop} must be >= 0")
    batch, length, channels = x.shape
    num_tokens = length - attn.num_prefix_tokens
    if plan is None:
        plan = attn.loop_plan(num_tokens, loop, x.device)
    if plan.perm is not None:
        x = permute_tokens_with_inverse(x, plan.perm, plan.inverse, attn.num_prefix_tokens)
    q, k, v = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, attn.head_dim).unbind(2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            # a trace holds the group layout of its input size as constants, which is what tracing means
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            groups = TokenGroups(num_tokens, plan.num_groups, attn.num_prefix_tokens)
    else:
        groups = TokenGroups(num_tokens, plan.num_groups, attn.num_prefix_tokens)
    x = group_attention(
        q, k, v,
        groups,
        scale=attn.scale,
        dropout_p=attn.attn_drop if attn.training else 0.0,
        backend=attn.backend,
    ).reshape(batch, length, channels)
    if plan.inverse is not None:
        x = permute_tokens_with_inverse(x, plan.inverse, plan.perm, attn.num_prefix_tokens)
    return attn.proj_drop(attn.proj(attn.norm(x)))


torch.fx.wrap("sliced_attention_forward")
