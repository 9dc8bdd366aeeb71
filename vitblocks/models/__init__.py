"""Complete models built from vitblocks layers, registered in timm's model registry."""

from vitblocks.models.sret import SReT, SReTStage

__all__ = ["SReT", "SReTStage"]
