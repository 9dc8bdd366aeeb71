"""DeiT-Tiny converted to 6 shared blocks with per-loop LoRA, uptrained by distillation from DeiT-Tiny on ImageNet-1k.

Relaxed Recursive Transformers (Bae et al.) for a vision transformer: the 12 blocks become
6 unique blocks cycled twice, initialised stepwise, each use with rank-8 LoRA (and its own
norms and biases) set from the SVD of what its original layer differs by; the unshared
DeiT-Tiny is the teacher. Save its weights first (the machine that trains needs them
locally):

    python -c "import timm, torch; \\
        torch.save(timm.create_model('deit_tiny_patch16_224', pretrained=True).state_dict(), 'deit_tiny.pth')"
    torchrun --nproc_per_node 8 -m vitblocks.train recipes/deit_tiny_uptrain.py \\
        --set data.root=/data/imagenet model.convert.base_checkpoint=deit_tiny.pth \\
        distill.teacher_checkpoint=deit_tiny.pth
"""

from pathlib import Path

from vitblocks.train import derive, load_recipe

config = derive(
    load_recipe(Path(__file__).parent / "sret_t_imagenet.py"),
    model={"name": "deit_tiny_patch16_224", "kwargs": {"drop_path_rate": 0.0},
           "convert": {"base_checkpoint": "deit_tiny.pth", "share": "cycle", "loops": 2, "init": "stepwise",
                       "rank": 8}},
    distill={"kind": "soft", "teacher": "deit_tiny_patch16_224", "teacher_checkpoint": "deit_tiny.pth"},
    optim={"lr_per_512": 2.5e-4},
    schedule={"warmup_epochs": 2},
    epochs=30,
    output_dir="runs/deit_tiny_uptrain_imagenet",
)
