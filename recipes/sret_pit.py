"""SReT-T on ImageNet-1k with the paper's DeiT-style recipe: `recipes/sret_t_imagenet.py`,
kept under the name the README has always used.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_pit.py --set data.root=/data/imagenet
"""

from pathlib import Path

from vitblocks.train import load_recipe

config = load_recipe(Path(__file__).parent / "sret_t_imagenet.py")
