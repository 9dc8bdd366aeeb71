"""Swin-T with every (W-MSA, SW-MSA) block pair applied twice and a NonLinearMix after each application, on ImageNet-1k.

The DeiT recipe of recipes/sret_pit.py with model `swin_tiny_rec_patch4_window7_224`. Other variants of the same
family (sliced attention, shared weights) are a `--set model.name=...` away; list them with
`python -c "import timm, vitblocks; print(timm.list_models('*_rec*') + timm.list_models('*_shared*'))"`.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/swin_tiny_rec.py --set data.root=/data/imagenet
"""

from vitblocks.train import derive_recipe

config = derive_recipe(__file__, "sret_pit.py", [
    'model.name=swin_tiny_rec_patch4_window7_224',
    "model.kwargs={'drop_path_rate': 0.2}",
    "output_dir='runs/swin_tiny_rec_imagenet'",
])
