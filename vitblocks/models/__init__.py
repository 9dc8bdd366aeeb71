"""Complete models built from vitblocks layers, registered in timm's model registry.

`sret` holds the SReT architecture and `sret_variants` its registered variants;
`official` converts checkpoints of the official SReT code; `plug` makes timm's DeiT/ViT,
PiT and Swin recursive.
"""

from vitblocks.models import plug, sret_variants
from vitblocks.models.plug import load_base_weights, make_recursive
from vitblocks.models.sret import SReT, SReTStage

__all__ = ["SReT", "SReTStage", "load_base_weights", "make_recursive", "plug", "sret_variants"]
