"""Independent reference implementations the tests compare against.

Written without any vitblocks code: masks come from plain Python lists and attention is
a dense masked softmax in float64.
"""

import torch


def near_equal_sizes(num_tokens: int, num_groups: int) -> list[int]:
    base, extra = divmod(num_tokens, num_groups)
    return [base + 1 if i < extra else base for i in range(num_groups)]


def dense_group_mask(num_tokens: int, num_groups: int, num_prefix: int = 0, order=None) -> torch.Tensor:
    """Allowed-attention mask over prefix + patch tokens in their original order.

    `order[j]` is the original patch index placed at position j of the sliced sequence
    (None: identity); groups are contiguous chunks of that sliced sequence.
    """
    group_of_position = []
    for g, size in enumerate(near_equal_sizes(num_tokens, num_groups)):
        group_of_position += [g] * size
    order = list(range(num_tokens)) if order is None else [int(i) for i in order]
    group_of_token = [0] * num_tokens
    for position, token in enumerate(order):
        group_of_token[token] = group_of_position[position]
    total = num_prefix + num_tokens
    mask = torch.zeros(total, total, dtype=torch.bool)
    for i in range(total):
        for j in range(total):
            if i < num_prefix or j < num_prefix:
                mask[i, j] = True
            else:
                mask[i, j] = group_of_token[i - num_prefix] == group_of_token[j - num_prefix]
    return mask


def masked_attention(q, k, v, mask, scale=None):
    """q, k, v: (B, N, H, D); mask: (N, N) bool, True = may attend."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
