"""SReT-S on ImageNet-1k: the SReT-T recipe with drop path 0.2.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_s.py --set data.root=/data/imagenet
"""

from vitblocks.train import derive_recipe

config = derive_recipe(__file__, "sret_pit.py", [
    'model.name=sret_s',
    "model.kwargs={'drop_path_rate': 0.2}",
    "output_dir='runs/sret_s_imagenet'",
])
