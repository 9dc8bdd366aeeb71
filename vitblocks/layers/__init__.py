"""Composable layers: recursion, sliced group attention, mixing, and SReT's stem parts."""

from vitblocks.layers.block import TransformerBlock
from vitblocks.layers.depth import set_loops
from vitblocks.layers.drop import DropPath
from vitblocks.layers.early_exit import EarlyExit, exit_logits, set_exit_threshold
from vitblocks.layers.mix import NonLinearMix
from vitblocks.layers.modes import CheckpointMode, MixMode, PermutationPolicy
from vitblocks.layers.per_loop import LoopLayerNorm, LoopLayerScale, LoopLoRALinear
from vitblocks.layers.permutation import (
    PERMUTATION_POLICIES,
    cached_fixed_permutation,
    fixed_permutation,
    inverse_permutation,
    permute_tokens,
    random_permutation,
)
from vitblocks.layers.pool import ConvPool
from vitblocks.layers.position import PositionMap, resize_position_map
from vitblocks.layers.recursive import Recursive
from vitblocks.layers.regional import compile_regions
from vitblocks.layers.relax import RelaxedBlock, relax_recursion
from vitblocks.layers.relaxation import DEFAULT_TARGETS, Relaxation
from vitblocks.layers.routing import TokenRouting, auxiliary_loss, routing_capacities
from vitblocks.layers.schedule import GroupSchedule
from vitblocks.layers.shared_sequence import SharedSequence
from vitblocks.layers.shared_stack import SharedStack
from vitblocks.layers.sharing import sharing_assignment
from vitblocks.layers.sliced import LoopPlan, SlicedGroupAttention
from vitblocks.layers.stem import ConvStem

__all__ = [
    "DEFAULT_TARGETS",
    "LoopLayerNorm",
    "LoopLayerScale",
    "LoopLoRALinear",
    "RelaxedBlock",
    "Relaxation",
    "SharedSequence",
    "SharedStack",
    "relax_recursion",
    "routing_capacities",
    "set_loops",
    "sharing_assignment",
    "PERMUTATION_POLICIES",
    "CheckpointMode",
    "ConvPool",
    "ConvStem",
    "DropPath",
    "EarlyExit",
    "exit_logits",
    "set_exit_threshold",
    "GroupSchedule",
    "LoopPlan",
    "MixMode",
    "NonLinearMix",
    "PermutationPolicy",
    "PositionMap",
    "Recursive",
    "SlicedGroupAttention",
    "TokenRouting",
    "auxiliary_loss",
    "TransformerBlock",
    "cached_fixed_permutation",
    "compile_regions",
    "fixed_permutation",
    "inverse_permutation",
    "permute_tokens",
    "random_permutation",
    "resize_position_map",
]
