"""Grouped attention in TorchScript: what a scripted sliced attention layer calls.

TorchScript cannot compile the backend dispatch (a context variable, a registry of
backend objects), so a scripted model runs its grouped attention here: PyTorch's
`scaled_dot_product_attention`, with the groups laid out exactly as the eager backends
lay them out (`vitblocks.attention.groups.group_runs`), so both give the same result.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from vitblocks.attention.groups import group_runs


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
    """Attention on (B, N, H, D) tensors."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, scale=scale
    )
    return out.transpose(1, 2)


def fold_run(x: torch.Tensor, start: int, count: int, size: int) -> torch.Tensor:
    """Fold one run of equal groups into the batch dimension.

    Args:
        x: Patch tokens (B, N, H, D).
        start: Offset of the run's first token.
        count: Groups in the run.
        size: Tokens per group.

    Returns:
        (B * count, size, H, D).
    """
    return x[:, start : start + count * size].reshape(x.shape[0] * count, size, x.shape[2], x.shape[3])


def with_prefix(groups_kv: torch.Tensor, prefix_kv: torch.Tensor, count: int) -> torch.Tensor:
    """Prepend each sample's prefix keys (or values) to each of its `count` groups.

    Args:
        groups_kv: Folded keys or values (B * count, size, H, D).
        prefix_kv: The prefix tokens' keys or values (B, P, H, D).
        count: Groups per sample.

    Returns:
        (B * count, P + size, H, D).
    """
    b, p, h, d = prefix_kv.shape[0], prefix_kv.shape[1], prefix_kv.shape[2], prefix_kv.shape[3]
    prefix = prefix_kv.unsqueeze(1).expand(b, count, p, h, d).reshape(b * count, p, h, d)
    return torch.cat([prefix, groups_kv], dim=1)


def scripted_group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_groups: int,
    num_prefix_tokens: int,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """`group_attention` with SDPA, in a form TorchScript compiles.

    Args:
        q: Queries (B, P + N, H, D), prefix tokens first.
        k: Keys, same shape.
        v: Values, same shape.
        num_groups: Groups of the N patch tokens.
        num_prefix_tokens: P.
        scale: Factor on the query-key products.
        dropout_p: Dropout on the attention weights.

    Returns:
        (B, P + N, H, D).

    Example:
        >>> import torch
        >>> from vitblocks.attention import group_attention
        >>> q, k, v = torch.randn(3, 2, 11, 2, 8).unbind(0)
        >>> torch.allclose(scripted_group_attention(q, k, v, 4, 1, 8 ** -0.5, 0.0),
        ...                group_attention(q, k, v, 4, num_prefix_tokens=1), atol=1e-6)
        True
    """
    if num_groups == 1:
        return _sdpa(q, k, v, scale, dropout_p)
    p = num_prefix_tokens
    outputs: List[torch.Tensor] = []
    if p > 0:
        outputs.append(_sdpa(q[:, :p], k, v, scale, dropout_p))
    for start, count, size in group_runs(q.shape[1] - p, num_groups):
        qg, kg, vg = fold_run(q[:, p:], start, count, size), fold_run(k[:, p:], start, count, size), fold_run(v[:, p:], start, count, size)
        if p > 0:
            kg = with_prefix(kg, k[:, :p], count)
            vg = with_prefix(vg, v[:, :p], count)
        out = _sdpa(qg, kg, vg, scale, dropout_p)
        outputs.append(out.reshape(q.shape[0], count * size, q.shape[2], q.shape[3]))
    return torch.cat(outputs, dim=1)
