"""A one-block ViT in bViT's layout, on ImageNet-1k: DeiT-Tiny's widths, one block applied 12 times.

`deit_tiny_one_block_patch16_224` has a 12th of DeiT-Tiny's block parameters at the same
MACs. Adaptive depth on top: `--set "model.kwargs.routing={'capacity': 'descending'}"`
(expert-choice) or `{'mode': 'token'}`. The DeiT recipe of recipes/sret_t_imagenet.py,
drop path 0.1.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/deit_tiny_one_block.py --set data.root=/data/imagenet
"""

from pathlib import Path

from vitblocks.train import derive, load_recipe

config = derive(load_recipe(Path(__file__).parent / "sret_t_imagenet.py"),
                model={"name": "deit_tiny_one_block_patch16_224", "kwargs": {"drop_path_rate": 0.1}},
                output_dir="runs/deit_tiny_one_block_imagenet")
