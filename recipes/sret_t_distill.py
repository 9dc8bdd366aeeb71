"""SReT-T distilled from a timm teacher with SReT's soft-label loss (no distillation token).

The paper's teacher is a RegNetY-16GF; give its weights with
`--set distill.teacher_checkpoint=/path/to/regnety_160.pth`.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_t_distill.py \\
        --set data.root=/data/imagenet distill.teacher_checkpoint=/weights/regnety_160.pth
"""

from vitblocks.train import derive_recipe

config = derive_recipe(__file__, "sret_pit.py", [
    'model.name=sret_t',
    'distill.kind=soft',
    'distill.teacher=regnety_160',
    'distill.temperature=1.0',
    "output_dir='runs/sret_t_distill_imagenet'",
])
