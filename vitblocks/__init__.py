"""vitblocks: composable building blocks for efficient vision transformers.

Importing the package registers its models with timm (`timm.create_model("sret_t")`).

Examples:
    >>> from vitblocks import Recursive, TransformerBlock
    >>> stage = Recursive(TransformerBlock(dim=192, num_heads=3), loops=2)
    >>> sum(p.numel() for p in stage.parameters())
    444864
"""

from vitblocks import models
from vitblocks.attention import AttentionBackendError, TokenGroups, attention_backend, group_attention
from vitblocks.layers import (
    ConvPool,
    ConvStem,
    NonLinearMix,
    PositionMap,
    Recursive,
    RelaxedBlock,
    SharedSequence,
    SlicedGroupAttention,
    TokenRouting,
    TransformerBlock,
    compile_regions,
    relax_recursion,
    set_loops,
)
from vitblocks.models import SReT

__version__ = "0.1.0"

__all__ = [
    "AttentionBackendError",
    "ConvPool",
    "ConvStem",
    "NonLinearMix",
    "PositionMap",
    "Recursive",
    "RelaxedBlock",
    "SReT",
    "SharedSequence",
    "SlicedGroupAttention",
    "TokenGroups",
    "TokenRouting",
    "TransformerBlock",
    "attention_backend",
    "compile_regions",
    "group_attention",
    "models",
    "relax_recursion",
    "set_loops",
]
