"""Multi-head attention over token groups, with xformers, SDPA and math kernels.

Examples:
    >>> import torch
    >>> from vitblocks.attention import group_attention
    >>> q = k = v = torch.randn(2, 64, 4, 16)   # (batch, tokens, heads, head_dim)
    >>> group_attention(q, k, v, groups=8).shape
    torch.Size([2, 64, 4, 16])
"""

from vitblocks.attention.backends import AttentionBackend
from vitblocks.attention.dispatch import (
    CPU_BF16_MATH_MAX_KEYS,
    ENV_VAR,
    AttentionBackendError,
    attention_backend,
    auto_order,
    auto_prefers_math,
    available_backends,
    group_attention,
    requested_backend,
    select_backend,
)
from vitblocks.attention.groups import GroupRun, TokenGroups
from vitblocks.attention.registry import AUTO, BACKENDS, backend_names, register_backend, unregister_backend

__all__ = [
    "AUTO",
    "BACKENDS",
    "CPU_BF16_MATH_MAX_KEYS",
    "ENV_VAR",
    "AttentionBackend",
    "AttentionBackendError",
    "GroupRun",
    "TokenGroups",
    "attention_backend",
    "auto_order",
    "auto_prefers_math",
    "available_backends",
    "backend_names",
    "group_attention",
    "register_backend",
    "requested_backend",
    "select_backend",
    "unregister_backend",
]
