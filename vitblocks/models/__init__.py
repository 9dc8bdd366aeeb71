"""Complete models built from vitblocks layers, registered in timm's model registry."""

from vitblocks.models import plug
from vitblocks.models.plug import load_base_weights, make_recursive
from vitblocks.models.sret import SReT, SReTStage

__all__ = ["SReT", "SReTStage", "load_base_weights", "make_recursive", "plug"]
