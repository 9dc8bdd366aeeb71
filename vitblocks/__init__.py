"""vitblocks: composable building blocks for efficient vision transformers.

Example:
    >>> from vitblocks import Recursive, TransformerBlock
    >>> stage = Recursive(TransformerBlock(dim=192, num_heads=3), loops=2)
    >>> sum(p.numel() for p in stage.parameters())
    444864
"""

from vitblocks.attention import AttentionBackendError, TokenGroups, attention_backend, group_attention
from vitblocks.layers import (
    ConvPool,
    ConvStem,
    NonLinearMix,
    PositionMap,
    Recursive,
    SlicedGroupAttention,
    TransformerBlock,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionBackendError",
    "ConvPool",
    "ConvStem",
    "NonLinearMix",
    "PositionMap",
    "Recursive",
    "SlicedGroupAttention",
    "TokenGroups",
    "TransformerBlock",
    "attention_backend",
    "group_attention",
]
