"""DeiT-Tiny with every block applied twice and a NonLinearMix after each application, on ImageNet-1k.

The DeiT recipe of recipes/sret_pit.py with model `deit_tiny_rec_patch16_224`. Other variants of the same
family (sliced attention, shared weights) are a `--set model.name=...` away; list them with
`python -c "import timm, vitblocks; print(timm.list_models('*_rec*') + timm.list_models('*_shared*'))"`.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/deit_tiny_rec.py --set data.root=/data/imagenet
"""

from vitblocks.train import derive_recipe

config = derive_recipe(__file__, "sret_pit.py", [
    'model.name=deit_tiny_rec_patch16_224',
    "output_dir='runs/deit_tiny_rec_imagenet'",
])
