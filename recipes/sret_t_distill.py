"""SReT-T distilled from a timm teacher with SReT's soft-label loss (no distillation token).

The paper's teacher is a RegNetY-16GF; give its weights with
`--set distill.teacher_checkpoint=/path/to/regnety_160.pth`. The weights this trains are
what timm's tag `sret_t.distill_in1k` names.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_t_distill.py \\
        --set data.root=/data/imagenet distill.teacher_checkpoint=/weights/regnety_160.pth
"""

from pathlib import Path

from vitblocks.train import derive, load_recipe

config = derive(load_recipe(Path(__file__).parent / "sret_t_imagenet.py"),
                distill={"kind": "soft", "teacher": "regnety_160", "temperature": 1.0},
                output_dir="runs/sret_t_distill_imagenet")
