"""SReT-S on ImageNet-1k: the SReT-T recipe with drop path 0.2.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_s.py --set data.root=/data/imagenet
"""

import dataclasses
import runpy
from pathlib import Path

base = runpy.run_path(str(Path(__file__).with_name("sret_pit.py")))["config"]
config = dataclasses.replace(
    base,
    model=dataclasses.replace(base.model, name="sret_s", kwargs=dict(drop_path_rate=0.2)),
    output_dir="runs/sret_s_imagenet",
)
