"""Swin-T with every (W-MSA, SW-MSA) block pair applied twice and a NonLinearMix after each application, on ImageNet-1k.

The DeiT recipe of recipes/sret_t_imagenet.py with model `swin_tiny_rec_patch4_window7_224` (drop path 0.2). Other
variants of the same family (sliced attention, shared weights) are a `--set model.name=...`
away; list them with
`python -c "import timm, vitblocks; print(timm.list_models('*_rec*') + timm.list_models('*_shared*'))"`.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/swin_tiny_rec.py --set data.root=/data/imagenet
"""

from pathlib import Path

from vitblocks.train import derive, load_recipe

config = derive(load_recipe(Path(__file__).parent / "sret_t_imagenet.py"),
                model={"name": "swin_tiny_rec_patch4_window7_224", "kwargs": {"drop_path_rate": 0.2}},
                output_dir="runs/swin_tiny_rec_imagenet")
