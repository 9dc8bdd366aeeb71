"""SReT-T distilled from a timm teacher with SReT's soft-label loss (no distillation token).

The paper's teacher is a RegNetY-16GF; give its weights with
`--set distill.teacher_checkpoint=/path/to/regnety_160.pth`.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_t_distill.py \\
        --set data.root=/data/imagenet distill.teacher_checkpoint=/weights/regnety_160.pth
"""

import dataclasses
import runpy
from pathlib import Path

from vitblocks.train import DistillConfig

base = runpy.run_path(str(Path(__file__).with_name("sret_pit.py")))["config"]
config = dataclasses.replace(
    base,
    model=dataclasses.replace(base.model, name="sret_t_distill"),
    distill=DistillConfig(kind="soft", teacher="regnety_160", temperature=1.0),
    output_dir="runs/sret_t_distill_imagenet",
)
