"""Complete models built from vitblocks layers, registered in timm's model registry.

`sret` holds the SReT architecture and `sret_variants` its registered variants;
`official` converts checkpoints of the official SReT code; `plug` makes timm's DeiT/ViT,
PiT and Swin recursive (one adapter per family in `families`, the planning in
`recursion_plan`), and `plugged_variants` registers the recursive DeiT/PiT/Swin models;
`convert` turns a trained unshared model into a shared (relaxed) one.
"""

from vitblocks.models import families, plug, plugged_variants, sret_variants
from vitblocks.models.convert import ConversionReport, convert_to_recursive
from vitblocks.models.families import FamilyAdapter, register_family
from vitblocks.models.plug import load_base_weights, make_recursive, recursion_plan_of
from vitblocks.models.recursion_plan import RecursionPlan
from vitblocks.models.registry import registered_models
from vitblocks.models.sret import SReT
from vitblocks.models.sret_stage import SReTStage

__all__ = [
    "ConversionReport",
    "FamilyAdapter",
    "RecursionPlan",
    "SReT",
    "SReTStage",
    "families",
    "convert_to_recursive",
    "load_base_weights",
    "make_recursive",
    "plug",
    "plugged_variants",
    "recursion_plan_of",
    "register_family",
    "registered_models",
    "sret_variants",
]
