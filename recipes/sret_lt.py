"""SReT-LT on ImageNet-1k: the SReT-T recipe with the larger MLP model.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_lt.py --set data.root=/data/imagenet
"""

import dataclasses
import runpy
from pathlib import Path

base = runpy.run_path(str(Path(__file__).with_name("sret_pit.py")))["config"]
config = dataclasses.replace(
    base,
    model=dataclasses.replace(base.model, name="sret_lt"),
    output_dir="runs/sret_lt_imagenet",
)
