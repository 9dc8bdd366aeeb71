"""DeiT-Tiny in Mixture-of-Recursions' layout, on ImageNet-1k.

`deit_tiny_mor_patch16_224`: 4 unique blocks applied in turn 3 times; the second and third
uses update only the 2/3 and 1/3 of the tokens their routers pick (expert-choice, class
token pinned), so the blocks cost about 0.66x of DeiT-Tiny's MACs with 0.38x of its
parameters. Token-choice instead (each token picks its depth; the trainer adds the
balancing loss): `--set "model.kwargs.routing={'mode': 'token'}"`. The DeiT recipe of
recipes/sret_t_imagenet.py, drop path 0.1.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/deit_tiny_mor.py --set data.root=/data/imagenet
"""

from pathlib import Path

from vitblocks.train import derive, load_recipe

config = derive(load_recipe(Path(__file__).parent / "sret_t_imagenet.py"),
                model={"name": "deit_tiny_mor_patch16_224", "kwargs": {"drop_path_rate": 0.1}},
                output_dir="runs/deit_tiny_mor_imagenet")
