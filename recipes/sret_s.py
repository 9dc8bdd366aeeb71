"""SReT-S on ImageNet-1k: the SReT-T recipe with the larger model (drop path 0.2, its default).

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_s.py --set data.root=/data/imagenet
"""

from pathlib import Path

from vitblocks.train import derive, load_recipe

config = derive(load_recipe(Path(__file__).parent / "sret_t_imagenet.py"),
                model={"name": "sret_s"}, output_dir="runs/sret_s_imagenet")
