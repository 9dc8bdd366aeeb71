"""SReT-LT on ImageNet-1k: the SReT-T recipe with the larger MLP model.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_lt.py --set data.root=/data/imagenet
"""

from vitblocks.train import derive_recipe

config = derive_recipe(__file__, "sret_pit.py", [
    'model.name=sret_lt',
    "output_dir='runs/sret_lt_imagenet'",
])
