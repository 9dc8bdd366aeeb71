"""Multi-head attention over token groups, with xformers, SDPA and math kernels.

Example:
    >>> import torch
    >>> from vitblocks.attention import group_attention
    >>> q = k = v = torch.randn(2, 64, 4, 16)   # (batch, tokens, heads, head_dim)
    >>> group_attention(q, k, v, groups=8).shape
    torch.Size([2, 64, 4, 16])
"""

from vitblocks.attention.backends import BACKENDS, AttentionBackend
from vitblocks.attention.dispatch import (
    BACKEND_NAMES,
    CPU_BF16_MATH_MAX_KEYS,
    ENV_VAR,
    AttentionBackendError,
    attention_backend,
    auto_prefers_math,
    available_backends,
    group_attention,
    requested_backend,
    select_backend,
)
from vitblocks.attention.groups import GroupRun, TokenGroups

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "CPU_BF16_MATH_MAX_KEYS",
    "ENV_VAR",
    "AttentionBackend",
    "AttentionBackendError",
    "GroupRun",
    "TokenGroups",
    "attention_backend",
    "auto_prefers_math",
    "available_backends",
    "group_attention",
    "requested_backend",
    "select_backend",
]
